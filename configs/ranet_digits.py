"""A small RANet on the embedded digits (the demo's data and schedule,
configs/digits.py): 3 scales (8, 16 and 32 px flows), 2 + 1 + 1 blocks
of 2 layers per flow from the lowest resolution up, 4 exits.

  python -m experiments.main --config=configs/ranet_digits.py --workdir=/tmp/ranet_digits
"""

from configs import common
from configs import digits


def get_config():
  # The same as --config=configs/digits.py --config.model.name=ranet.
  return common.use_model(digits.get_config(), 'ranet')
