"""Peer servers the fan-out benchmark compares the shim with."""
