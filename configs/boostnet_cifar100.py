"""BoostNet on CIFAR-100 (Yu et al., "Boosted Dynamic Neural Networks",
AAAI 2023), as the original's `msdnet_scripts/train_cifar100_batch.sh`
trains it for budgeted classification (its CIFAR-100 budgeted figure):

  --arch msdnet_ge --nBlocks 6 --stepmode even --step 2 --base 4
  --nChannels 16 --growthRate 6 --grFactor 1-2-4 --bnFactor 1-2-4
  --ensemble_reweight 0.5 --lr_f 0.1 --lr_milestones 150,225 --epochs 300
  --batch-size 64 --weight-decay 1e-4 --use-valid

Train and evaluate:
  python -m experiments.main --config=configs/boostnet_cifar100.py --workdir=/tmp/boostnet_cifar100

The anytime setting of the same paper uses 10 blocks:
--config.model.n_blocks=10 (the original's anytime runs have no holdout:
--config.eval.protocol=train).
"""

from configs import common


def get_config():
  config = common.base_config()
  config.method = 'boostnet'
  config.dataset.name = 'cifar100'
  config.dataset.num_classes = 100

  config.model.n_blocks = 6
  config.model.step_mode = 'even'
  config.model.step = 2
  config.model.base = 4

  config.boostnet.reweight = (0.5,)
  config.train.batch_size = 64
  config.train.lr = 0.1
  config.train.schedule = 'multistep'
  config.train.lr_milestones = (0.5, 0.75)  # epochs 150 and 225 of 300
  config.train.epochs = 300
  config.eval.protocol = 'holdout'  # --use-valid
  return config
