"""The Centrifuge client protocol v2 (JSON): codes, codec and the session state machine."""
