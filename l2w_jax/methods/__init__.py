"""The training methods, one module each; every module registers its
method(s) with `l2w_jax.training.registry` when imported (the registry
imports them all on first lookup)."""
