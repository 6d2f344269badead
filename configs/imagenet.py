"""L2W-DEN on ImageNet: MSDNet (5 exits, step 4) as in the paper's Table/Fig.

Train and evaluate (ImageNet prepared for tfds, see the README):
  python -m experiments.main --config=configs/imagenet.py --workdir=/tmp/l2w_imagenet

The original's command: --nBlocks 5 --stepmode even --step 4 --base 4
--nChannels 32 --growthRate 16 --grFactor 1-2-4-4 --bnFactor 1-2-4-4
--meta_interval 100 --meta_lr 1e-4 --meta_weight_decay 1e-4 --epsilon 0.3
--target_p_index 15 --meta_net_input_type loss --constraint_dimension mat
--epochs 100 --batch-size 4096 --lr 0.8 --lr-type cosine. Its released
checkpoint (step 4, 100 epochs) reports 59.54 / 67.22 / 71.03 / 72.33 / 73.93
top-1 at the five exits. Steps 6 and 7: --config.model.step=6
--config.model.base=6.
"""

from configs import common


def get_config():
  config = common.base_config()
  config.dataset.name = 'imagenet2012'
  config.dataset.num_classes = 1000
  config.dataset.image_size = 224
  config.dataset.augment = 'imagenet'  # RandomResizedCrop(224) + flip
  # Thresholds on 50,000 training images drawn once at random, augmented:
  # the original's eval_imagenet.py (its training script's final evaluation
  # reads the whole training loader).
  config.eval.threshold_images = 50000

  config.model.stem = 'imagenet'
  common.use_model(config, 'msdnet')  # MODEL_PRESETS['msdnet', 'imagenet']

  config.meta.epsilon = 0.3
  config.meta.constraint = 'mat'
  config.meta.interval = 100
  config.meta.lr = 1e-4
  config.meta.weight_decay = 1e-4
  config.meta.target_p_index = 15

  config.train.batch_size = 4096
  config.train.epochs = 100
  config.train.lr = 0.8
  config.train.label_smoothing = 0.0  # 0.1 for the 300-epoch variant
  return config
