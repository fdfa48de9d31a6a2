"""Hard-negative mining and false-negative filtering."""
