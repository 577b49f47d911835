"""Engine contract suite: every Broker/PresenceManager implementation passes these."""
