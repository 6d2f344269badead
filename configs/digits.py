"""L2W-DEN on scikit-learn's handwritten digits (the small real dataset most
tests train on; the demo is configs/graded_digits.py).

  python -m experiments.main --config=configs/digits.py --workdir=workdir/digits

The 1,797 real 8x8 digits that ship with scikit-learn, upsampled to 32x32,
split (stratified, fixed) into 1,257 training, 180 held-out (thresholds) and
360 test images; no download. A small 4-exit MSDNet trained with L2W for
8 epochs reaches >= 95 % top-1 at the last exit in a few minutes on 2 CPU
cores, compilation included (see the README for the figures of a run).
"""

from configs import common


def get_config():
  config = common.base_config()
  config.dataset.name = 'sklearn_digits'
  config.dataset.num_classes = 10
  config.dataset.augment = 'crop'  # no flips for digits
  # The builder's fixed 180-image validation split is held out, and the
  # thresholds are searched on it as it is. The embedded datasets have no
  # original; one program per run (full batches) keeps the quick start
  # short.
  config.eval.protocol = 'holdout'
  config.eval.threshold_augment = False
  config.train.last_batch = 'drop'

  common.use_model(config, 'msdnet')  # MODEL_PRESETS['msdnet', 'digits']

  config.meta.hidden_size = 100
  config.meta.lr = 1e-3

  config.train.batch_size = 64
  config.train.epochs = 8
  config.train.lr = 0.1
  config.train.log_every_steps = 19
  config.train.checkpoint_every_steps = 76
  config.train.eval_every_epochs = 4
  config.eval.batch_size = 180
  return config
