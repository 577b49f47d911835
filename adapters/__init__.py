"""Edges to the outside: engines (brokers), ingest sources and auth back ends."""
