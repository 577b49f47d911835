"""The protocol-free core: events, engine contracts, auth types, the node and its
outboxes, routing, cutover state and configuration. Imports nothing of ours
outside itself; both protocols and every adapter build on it."""
