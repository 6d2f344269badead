"""BoostNet on ImageNet (Yu et al., AAAI 2023), as the original's
`msdnet_scripts/train_imagenet_batch.sh` trains it for budgeted
classification (its ImageNet budgeted figure):

  --arch msdnet_ge --nBlocks 5 --stepmode even --step 5 --base 5
  --nChannels 32 --growthRate 16 --grFactor 1-2-4-4 --bnFactor 1-2-4-4
  --ensemble_reweight 0.5 --lr_f 0.1 --lr_milestones 30,60 --epochs 90
  --use-valid, on 4 GPUs x 64 images with SyncBatchNorm.

The anytime setting uses --config.model.step=7 --config.model.base=7.
"""

from configs import imagenet


def get_config():
  config = imagenet.get_config()
  config.method = 'boostnet'
  config.model.step = 5
  config.model.base = 5

  config.boostnet.reweight = (0.5,)
  config.train.batch_size = 256
  config.train.sync_bn = True  # the original's SyncBatchNorm over 4 GPUs
  config.train.lr = 0.1
  config.train.schedule = 'multistep'
  config.train.lr_milestones = (1 / 3, 2 / 3)  # epochs 30 and 60 of 90
  config.train.epochs = 90
  config.eval.protocol = 'holdout'  # --use-valid: 50,000 held out
  config.eval.threshold_images = 0
  return config
