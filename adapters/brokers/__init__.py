"""Engine implementations of shim.broker's Broker and PresenceManager."""
