"""Tiny models and configs shared by the tests."""

import ml_collections

from configs import common
from l2w_jax.models.msdnet import MSDNetConfig

# Two scales (16x16, 8x8) so that each classifier ends at 1x1.
TINY_MSDNET = MSDNetConfig(n_blocks=3, n_channels=4, growth_rate=2,
                           gr_factor=(1, 2), bn_factor=(1, 2),
                           step_mode='even', step=1, base=1, num_classes=5)
TINY_IMAGE = (16, 16, 3)


def tiny_config(**meta) -> ml_collections.ConfigDict:
  """A full experiment config around TINY_MSDNET."""
  config = common.base_config()
  config.dataset.num_classes = TINY_MSDNET.num_classes
  config.dataset.image_size = TINY_IMAGE[0]
  for field in ('n_blocks', 'n_channels', 'growth_rate', 'gr_factor',
                'bn_factor', 'step_mode', 'step', 'base'):
    setattr(config.model, field, getattr(TINY_MSDNET, field))
  config.meta.hidden_size = 8
  config.train.lr = 0.1
  config.meta.lr = 1e-2
  for key, value in meta.items():
    setattr(config.meta, key, value)
  return config
