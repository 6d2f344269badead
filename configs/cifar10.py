"""L2W-DEN on CIFAR-10: MSDNet with 5 exits (the paper's setting).

Train and evaluate:
  python -m experiments.main --config=configs/cifar10.py --workdir=/tmp/l2w_cifar10

Hyper-parameters of the original `tools/main_cifar_DDP.py` command line
(batch 1024, lr 0.8 cosine, 300 epochs, meta_interval 1, epsilon 0.8, `col`).
"""

from configs import common


def get_config():
  config = common.base_config()
  config.dataset.name = 'cifar10'
  config.dataset.num_classes = 10
  return config
