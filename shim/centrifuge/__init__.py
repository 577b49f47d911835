"""The Centrifuge client protocol v2 (JSON and Protobuf): codes, codecs, the session
state machine and the framing of its HTTP-streaming, SSE and emulation transports.
Imports only `shim.core`."""
