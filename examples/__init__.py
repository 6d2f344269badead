"""Extensions of l2w_jax that live outside the package (see docs/extending.md)."""
