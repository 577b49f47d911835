"""Token verification back ends."""
