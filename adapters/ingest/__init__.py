"""Ways events come in: HTTP (and later a Redis stream)."""
