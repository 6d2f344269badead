"""A small RANet on the embedded digits (the demo's data and schedule,
configs/digits.py): 3 scales (8, 16 and 32 px flows), 2 + 1 + 1 blocks
of 2 layers per flow from the lowest resolution up, 4 exits.

  python -m experiments.main --config=configs/ranet_digits.py --workdir=/tmp/ranet_digits
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.name = 'ranet'
  config.model.n_blocks = 2
  config.model.block_step = 1
  config.model.scale_list = (1, 2, 3)
  config.model.n_channels = 4
  config.model.growth_rate = 4
  config.model.gr_factor = (4, 2, 1)
  config.model.bn_factor = (4, 2, 1)
  config.model.step = 2
  config.model.step_mode = 'even'
  config.model.compress_factor = 0.25
  config.model.bn_after = True
  config.model.reduction = 0.5
  config.model.init = 'msdnet'
  return config
