"""L2W-DEN on long-tailed CIFAR-100 (Cui et al. 2019, exponential profile).

Train and evaluate (imbalance factor 100; 50 and 10 are the other usual ones):
  python -m experiments.main --config=configs/cifar100_lt.py --workdir=/tmp/l2w_c100lt \
      --config.dataset.imbalance_factor=100

Class c keeps floor(500 * (1/factor)^(c/99)) training images (10,847 for
factor 100); the test set is the balanced CIFAR-100 test set. Other settings
are the CIFAR-100 ones of the paper.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.dataset.name = 'cifar100_lt'
  config.dataset.num_classes = 100
  config.dataset.imbalance_factor = 100
  # The long-tailed set is small: hold out fewer images for thresholds.
  config.dataset.holdout = 1000
  return config
