"""L2W-DEN on CIFAR-100: MSDNet with 5 exits (the paper's setting).

Train and evaluate:
  python -m experiments.main --config=configs/cifar100.py --workdir=/tmp/l2w_cifar100

Paper (Han et al., ECCV 2022, Fig. 5 / Tab. 1): hyper-parameters of the
original `tools/main_cifar_DDP.py` command line; MSDNet 5 exits, lin_grow,
step 1, base 1, nChannels 16, growth 6, grFactor / bnFactor 1-2-4.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.dataset.name = 'cifar100'
  config.dataset.num_classes = 100
  return config
