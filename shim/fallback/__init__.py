"""Transports for clients that cannot use WebSocket, as Centrifugo serves them:
HTTP-streaming and SSE with bidirectional emulation (commands come back through
POST /emulation), and the unidirectional WebSocket, SSE and HTTP-streaming."""
