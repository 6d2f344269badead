"""L2W-DEN's meta-learning: the weighting rules (`weighting`), the training
step (`l2w`) and the meta-gradient with pluggable pieces (`api`)."""

from l2w_jax.meta.api import (MetaOptions, allocation_objective,
                              backbone_loss_fn, default_weight_fn, meta_gradient,
                              meta_loss)
