"""The legacy Dex hub protocol: its wire encoding, translation to events, and its sessions."""
