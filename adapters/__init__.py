"""Edges to the outside: engines (brokers), ingest sources and auth back ends. They
implement `shim.core` contracts and import nothing else of ours."""
