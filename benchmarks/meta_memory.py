r"""Peak memory and time of the L2W half step (virtual step, meta-gradient,
real step) with and without `meta.remat`, for 1 and 2 inner steps.

  python -m benchmarks.meta_memory --config=configs/cifar100.py --batch_size=64

For each (remat, inner_steps) the half step is compiled for the config's
model on one device (`with_meta=True`, halves of `--batch_size` images) and
one JSON line is printed, from XLA's memory analysis of the compiled
program: `peak_bytes` = arguments + outputs + temporaries - aliased bytes
(everything the program allocates), `temp_bytes` the temporaries alone
(what the backward pass keeps: remat's target; compiled with the
options the training step uses, `parallel.compiler_options`), `xla_peak_bytes` XLA's own
`peak_memory_in_bytes`; `seconds` the median wall time of a call over
`--iterations` calls after compilation, and `compile_s`.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from configs import common

from l2w_jax import parallel
from l2w_jax.methods import l2w
from l2w_jax.training.forward import split_halves
from l2w_jax.training.learner import build_learner, init_train_state

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar100.py')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per iteration (two '
                              'halves).')
_ITERS = flags.DEFINE_integer('iterations', 3, 'Timed calls per variant.')
_INNER = flags.DEFINE_list('inner_steps', ['1', '2'], 'meta.inner_steps '
                           'values.')


def measure(config, remat: bool, inner_steps: int, batch_size: int,
            iterations: int) -> dict:
  """The JSON row of one variant (see the module docstring)."""
  config = config.copy_and_resolve_references()
  config.meta.remat = remat
  config.meta.inner_steps = inner_steps
  learner = build_learner(config)
  size = config.dataset.image_size
  state = init_train_state(learner, jax.random.PRNGKey(0), (size, size, 3))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch_size, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, config.dataset.num_classes, batch_size,
                        dtype=np.int32)
  (xt, yt), (xm, ym) = split_halves(images, labels)
  step = jax.jit(lambda s, a, b, c, d: l2w.l2w_half_step(
      learner, s, a, b, c, d, 0.1, 1e-4, with_meta=True))
  start = time.perf_counter()
  compiled = step.lower(state, xt, yt, xm, ym).compile(
      compiler_options=parallel.compiler_options(remat, jax.default_backend()))
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  times = []
  for _ in range(iterations):
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, xt, yt, xm, ym))
    times.append(time.perf_counter() - start)
  return {'remat': remat, 'inner_steps': inner_steps,
          'peak_bytes': int(memory.argument_size_in_bytes +
                            memory.output_size_in_bytes +
                            memory.temp_size_in_bytes -
                            memory.alias_size_in_bytes),
          'temp_bytes': int(memory.temp_size_in_bytes),
          'xla_peak_bytes': int(memory.peak_memory_in_bytes),
          'seconds': round(statistics.median(times), 4),
          'compile_s': round(compile_s, 2), 'batch_size': batch_size}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = common.config_from_flag(_CONFIG)
  for inner_steps in [int(i) for i in _INNER.value]:
    for remat in (False, True):
      print(json.dumps(measure(config, remat, inner_steps, _BATCH.value,
                               _ITERS.value)), flush=True)


if __name__ == '__main__':
  app.run(main)
