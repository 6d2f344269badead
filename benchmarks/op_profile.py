r"""Where a half step's time goes, per kind of XLA operation.

  python -m benchmarks.op_profile --config=configs/cifar100.py --batch_size=64

Compiles the plain half step (uniform weights) or, with `--kind=l2w`, the
L2W half step with its meta step, on half of `--batch_size` random images,
runs it `--runs` times under `jax.profiler.trace` with XLA:CPU's per-thunk
trace events on (`--xla_cpu_enable_xprof_traceme`, set here before JAX
starts), and sums each operation's time by kind: the convolutions (inside
a library fusion or not), dots, reductions, concatenations, transposes and
the other (elementwise) fusions. Prints one JSON line: milliseconds per run
by kind, the number of operations of each kind, the wall-clock median, and
the ten slowest operations with their shapes. `--config.model.
conv_gradients=lax` profiles JAX's own convolution derivatives.
"""

import collections
import glob
import gzip
import json
import os
import statistics
import tempfile
import time

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_cpu_enable_xprof_traceme=true').strip()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from benchmarks import hlo_kinds
from benchmarks import step_problem
from configs import common
from l2w_jax.methods import l2w, uniform
from l2w_jax.training.forward import split_halves

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar100.py')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per iteration; a '
                              'half step sees half of them.')
_KIND = flags.DEFINE_enum('kind', 'plain', ['plain', 'l2w'], 'Which half '
                          'step.')
_RUNS = flags.DEFINE_integer('runs', 3, 'Profiled runs.')
_TOP = flags.DEFINE_integer('top', 10, 'Slowest operations listed.')

def _trace_events(directory: str):
  path, = glob.glob(os.path.join(directory, 'plugins', 'profile', '*',
                                 '*.trace.json.gz'))
  with gzip.open(path) as f:
    return [e for e in json.load(f)['traceEvents'] if e.get('ph') == 'X']


def main(argv):
  del argv
  config = common.config_from_flag(_CONFIG)
  learner, state, images, labels = step_problem.timing_problem(
      config, _BATCH.value)
  (x1, y1), (x2, y2) = split_halves(images, labels)
  lr, meta_lr = jnp.float32(0.1), jnp.float32(1e-4)
  if _KIND.value == 'plain':
    step = jax.jit(lambda s, x, y: uniform.uniform_half_step(
        learner, s, x, y, lr))
    args = (state, x1, y1)
  else:
    step = jax.jit(lambda s, xt, yt, xm, ym: l2w.l2w_half_step(
        learner, s, xt, yt, xm, ym, lr, meta_lr, with_meta=True))
    args = (state, x1, y1, x2, y2)
  compiled = step.lower(*args).compile()
  kinds = hlo_kinds.operation_kinds(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  walls = []
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      for _ in range(_RUNS.value):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        walls.append(time.perf_counter() - start)
    events = _trace_events(directory)
  totals, counts, each = (collections.Counter(), collections.Counter(),
                          collections.Counter())
  for event in events:
    if event['name'] in kinds:
      kind, _ = kinds[event['name']]
      totals[kind] += event['dur']
      counts[kind] += 1
      each[event['name']] += event['dur']
  runs = _RUNS.value
  print(json.dumps({
      'kind': _KIND.value, 'batch_size': _BATCH.value,
      'conv_gradients': config.model.get('conv_gradients', 'auto'),
      'wall_ms': round(1000 * statistics.median(walls), 1),
      'op_ms': round(sum(totals.values()) / 1000 / runs, 1),
      'ms_by_kind': {k: round(v / 1000 / runs, 1)
                     for k, v in totals.most_common()},
      'ops_by_kind': {k: v // runs for k, v in counts.most_common()},
      'slowest': [[name, kinds[name][1], round(v / 1000 / runs, 2)]
                  for name, v in each.most_common(_TOP.value)]}))


if __name__ == '__main__':
  app.run(main)
