"""Engine implementations of shim.core.broker's Broker and PresenceManager."""
