"""RANet on CIFAR-10, as the original's `train_cifar.sh` trains it
(yangle15/RANet-pytorch; the RANet paper's CIFAR-10 anytime and budgeted
results):

  python main.py --arch RANet --data cifar10 --step 4 --stepmode even
      --scale-list 1-2-3-3 --grFactor 4-2-1-1 --bnFactor 4-2-1-1

with args.py's defaults for the rest: nBlocks 2, nChannels 16, growthRate
6, block-step 2, compress-factor 0.25, bnAfter, reduction 0.5; 300 epochs,
batch 64, SGD lr 0.1 (momentum 0.9, weight decay 1e-4) divided by 10 at 50 %
and 75 % of the epochs. 8 exits. Its weights follow the original's
_init_weights (which, unlike MSDNet's, does reach every conv):
model.init='msdnet'.

  python -m experiments.main --config=configs/ranet_cifar10.py --workdir=/tmp/ranet_c10
  --config.method=l2w: L2W-DEN on this RANet (meta settings of configs/cifar100.py)
"""

from configs import common


def get_config():
  config = common.base_config()
  config.method = 'uniform'
  config.dataset.name = 'cifar10'
  config.dataset.num_classes = 10

  common.use_model(config, 'ranet')  # MODEL_PRESETS['ranet', 'cifar']

  config.train.batch_size = 64
  config.train.epochs = 300
  config.train.lr = 0.1
  config.train.schedule = 'multistep'
  config.train.lr_milestones = (0.5, 0.75)
  # RANet's published commands search thresholds on the test set (its
  # val_loader is the test loader); its code's --use-valid holdout, as
  # MSDNet's, is used here instead.
  config.eval.protocol = 'holdout'
  return config
