r"""Top-1 of the same run in float32 and with bfloat16 activations.

  python -m benchmarks.bf16_accuracy --config=configs/digits.py

Trains and evaluates the config twice from the same seed, once with
`train.compute_dtype=float32` and once with `bfloat16` (parameters,
optimizer states and losses stay float32; evaluation runs in float32), each
in a fresh temporary workdir. Prints one JSON line with the test top-1 at
every exit for both, the difference at the last exit (bfloat16 minus
float32, in points) and each run's seconds.
"""

import json
import tempfile
import time

from absl import app
from absl import logging
from ml_collections import config_flags

from configs import common

from l2w_jax.training.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits.py')


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  out = {}
  for dtype in ('float32', 'bfloat16'):
    config = common.config_from_flag(_CONFIG).copy_and_resolve_references()
    config.train.compute_dtype = dtype
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      results = train_and_evaluate(config, workdir)
      out[f'seconds_{dtype}'] = round(time.perf_counter() - start, 1)
    out[f'top1_{dtype}'] = [round(v, 2) for v in results['anytime']['top1']]
  out['last_exit_difference'] = round(
      out['top1_bfloat16'][-1] - out['top1_float32'][-1], 2)
  out['iterations'] = results['iterations']
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
