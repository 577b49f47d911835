"""The composition root: runtime, ASGI app, endpoints, server API, console, metrics
and CLI. It wires every other layer together; nothing imports it."""
