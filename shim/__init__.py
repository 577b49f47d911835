"""dex-realtime-shim: the gateway core and the Centrifuge client protocol."""

__version__ = "0.1.0"
