"""L2W-DEN on CIFAR-10: MSDNet with 5 exits (the paper's setting).

Train and evaluate:
  python -m experiments.main --config=configs/cifar10.py --workdir=/tmp/l2w_cifar10

The original publishes a command line for CIFAR-100 only (README,
`tools/main_cifar_DDP.py`); this is that command on CIFAR-10: batch 1024,
lr 0.8 cosine, 300 epochs, meta_interval 1, epsilon 0.8, `col`; trained on
all 50,000 images, 49 iterations an epoch, thresholds on the augmented
training set (docs/faithfulness.md, "Data protocol").
"""

from configs import common


def get_config():
  config = common.base_config()
  config.dataset.name = 'cifar10'
  config.dataset.num_classes = 10
  return config
