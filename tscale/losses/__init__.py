"""Pure loss functions: each returns a sum over tokens and the token count."""

from tscale.losses.lm import (
    IGNORE_INDEX,
    make_fused_lm_loss,
    make_lm_loss,
    token_cross_entropy,
)

__all__ = ["IGNORE_INDEX", "make_fused_lm_loss", "make_lm_loss", "token_cross_entropy"]
