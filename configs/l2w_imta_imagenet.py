"""L2W + IMTA on ImageNet: IMTA's two stages (configs/imta_imagenet.py: MSDNet
step 4, 90 + 90 epochs, batch 256, lr 0.1 multistep, T = 1, gamma = 0.1)
with L2W-DEN's weighting in stage 1, its meta settings those of the L2W-DEN
ImageNet script (configs/imagenet.py: meta interval 100, epsilon 0.3, 'mat',
meta lr 1e-4, meta weight decay 1e-4, target_p_index 15).

A reconstruction, not a released script: the L2W-DEN paper reports L2W
with IMTA, but its repository has no IMTA code and does not say how the two
were combined (README, "Other training methods").
"""

from configs import imta_imagenet


def get_config():
  config = imta_imagenet.get_config()
  config.method = 'l2w_imta'
  return config
