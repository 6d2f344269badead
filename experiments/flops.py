r"""Per-exit cumulative MFLOPs and Mparams of the configured backbone.

  python -m experiments.flops --config=configs/imagenet.py
  python -m experiments.flops --config=configs/imagenet.py --config.model.step=6 --config.model.base=6

The last line printed is JSON: {"mflops": [...], "mparams": [...]}.
"""

import json

from absl import app
from ml_collections import config_flags

from configs import common

from l2w_jax.evaluation.flops import count_per_exit
from l2w_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar100.py')


def main(argv):
  del argv
  config = common.config_from_flag(_CONFIG)
  model = build_model(config)
  size = config.dataset.image_size
  ops, params = count_per_exit(model, (size, size, 3))
  print(json.dumps({'mflops': [round(o / 1e6, 6) for o in ops],
                    'mparams': [round(p / 1e6, 6) for p in params]}))


if __name__ == '__main__':
  app.run(main)
