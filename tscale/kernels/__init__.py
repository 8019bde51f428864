"""tscale.kernels."""
