"""Training methods other than L2W: their losses and steps (registered by
`l2w_jax.training.methods`)."""
