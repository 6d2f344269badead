"""RANet on ImageNet, as the original's `train_imagenet.sh` trains it
(yangle15/RANet-pytorch; the RANet paper's ImageNet results):

  python main.py --arch RANet --data ImageNet --growthRate 16 --step 8
      --stepmode even --scale-list 1-2-3-4 --grFactor 4-2-1-1 --bnFactor 4-2-1-1

with args.py's defaults for the rest (nBlocks 2, nChannels 16, block-step 2,
compress-factor 0.25, bnAfter, reduction 0.5, batch 64, SGD lr 0.1, momentum
0.9, weight decay 1e-4) and its ImageNet schedule, lr / 10 every 30 epochs
(90 epochs: milestones at 1/3 and 2/3). 8 exits, 168 to 1681 MFLOPs.

  python -m experiments.flops --config=configs/ranet_imagenet.py
"""

from configs import common
from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.method = 'uniform'
  common.use_model(config, 'ranet')  # MODEL_PRESETS['ranet', 'imagenet']
  config.train.batch_size = 64
  config.train.epochs = 90
  config.train.lr = 0.1
  config.train.schedule = 'multistep'
  config.train.lr_milestones = (1 / 3, 2 / 3)
  # RANet's published commands search thresholds on the test set (its
  # val_loader is the test loader); its code's --use-valid holdout, as
  # MSDNet's, is used here instead.
  config.eval.protocol = 'holdout'
  config.eval.threshold_images = 0
  return config
