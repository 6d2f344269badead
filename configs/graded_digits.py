"""The demo: L2W-DEN against uniform weighting on `graded_digits`.

  python3 quickstart.py demo
  # = python -m experiments.demo --workdir=workdir/demo

scikit-learn's digits rendered with graded corruptions (see
`l2w_jax.data.graded_digits`): 3,771 training, 540 held-out (thresholds)
and 1,080 test images, no download.

The model is the digits MSDNet preset with two changes that put the
network's capacity in its blocks rather than in its exits, so that later
exits are clearly stronger: blocks of 1, 2, 3 and 4 layers (lin_grow, as
the CIFAR MSDNet) instead of one layer each, and exits whose two hidden
convs have 8 channels instead of the original's 128 (with 128, an exit is
a larger network than the blocks before it, and all four exits score within
one point of each other). 4 epochs (232 iterations) per method.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.dataset.name = 'graded_digits'
  config.dataset.num_classes = 10
  config.dataset.augment = 'crop'  # no flips for digits
  # As configs/digits.py: thresholds on the fixed validation split as it
  # is, full batches only.
  config.eval.protocol = 'holdout'
  config.eval.threshold_augment = False
  config.train.last_batch = 'drop'

  common.use_model(config, 'msdnet')  # MODEL_PRESETS['msdnet', 'digits']
  config.model.step_mode = 'lin_grow'
  config.model.classifier_width = 8

  config.meta.hidden_size = 100
  config.meta.lr = 1e-3

  config.train.batch_size = 64
  config.train.epochs = 4
  config.train.lr = 0.1
  config.train.log_every_steps = 24
  config.train.checkpoint_every_steps = 118
  config.train.eval_every_epochs = 4
  config.eval.batch_size = 270
  return config
