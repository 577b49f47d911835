"""The legacy Dex hub protocol: its wire encoding, commands, reads and sessions.
Imports only `shim.core`."""
