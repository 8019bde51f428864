"""tscale.parallel."""
