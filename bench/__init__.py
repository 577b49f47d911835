"""Fan-out benchmark: the shim side by side with what people would otherwise run."""
