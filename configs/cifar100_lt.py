"""L2W-DEN on long-tailed CIFAR-100 (CIFAR-100-LT).

Train and evaluate (imbalance factor 100; 50 and 10 are the other usual ones):
  python -m experiments.main --config=configs/cifar100_lt.py --workdir=/tmp/l2w_c100lt \
      --config.dataset.imbalance_factor=100

The original L2W-DEN repository has no long-tailed code. The subset is
LDAM-DRW's `IMBALANCECIFAR100` (Cao et al., NeurIPS 2019; imb_type 'exp',
rand_number 0), the exponential profile of Cui et al. (CVPR 2019): class c
keeps int(500 * (1/factor) ** (c/99)) images, 500 down to 500/factor,
chosen by `np.random.seed(0)` and one `np.random.shuffle` of each class's
positions in the CIFAR-100 file order (recovered from tfds' 'id'), in class
order. Training images: 10,847 at factor 100, 12,608 at 50, 19,573 at 10,
all of them trained on under the default eval.protocol=train (thresholds on
them, augmented); eval.protocol=holdout holds 1,000 of them out. The test
set is the balanced CIFAR-100 test set (10,000). Other settings are the
CIFAR-100 ones of the paper: 11 iterations per epoch at batch 1024, the
last of 607 images (10,847 - 10 * 1024), 3,300 iterations in 300 epochs.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.dataset.name = 'cifar100_lt'
  config.dataset.num_classes = 100
  config.dataset.imbalance_factor = 100
  return config
