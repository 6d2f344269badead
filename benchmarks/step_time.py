r"""Times a plain multi-exit iteration against an L2W iteration.

  python -m benchmarks.step_time --config=configs/cifar100.py --batch_size=64

Both iterations run on the same model and the same batch, split into two
halves with one update per half (the plain one with uniform weights, the L2W
one with a meta step on each half), in two ways: the half steps jitted
directly (`plain_s`, `l2w_s`), and the training loop's iterations
(`step.make_iteration`: `shard_map` over a mesh of `--devices` devices, the
batch handed over from host memory each time; `mesh_plain_s`,
`mesh_l2w_s`). Prints one JSON line: medians over `--iterations` runs after
compilation, the L2W half step's compile time (`compile_s`) and the first
call of the loop's L2W iteration (`mesh_l2w_first_call_s`: compiling the
whole iteration, then running it once).
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from benchmarks import step_problem
from configs import common

from l2w_jax import parallel
from l2w_jax.methods import l2w, uniform
from l2w_jax.training.forward import split_halves
from l2w_jax.training import step as step_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar100.py')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per iteration.')
_ITERS = flags.DEFINE_integer('iterations', 7, 'Timed iterations per kind.')
_DEVICES = flags.DEFINE_integer('devices', 1, 'Devices of the mesh timed.')


def _timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def main(argv):
  del argv
  learner, state, images, labels = step_problem.timing_problem(
      common.config_from_flag(_CONFIG), _BATCH.value)
  (x1, y1), (x2, y2) = split_halves(images, labels)
  lr, meta_lr = jnp.float32(0.1), jnp.float32(1e-4)

  plain_jit = jax.jit(
      lambda s, x, y: uniform.uniform_half_step(learner, s, x, y, lr))
  meta_jit = jax.jit(lambda s, xt, yt, xm, ym: l2w.l2w_half_step(
      learner, s, xt, yt, xm, ym, lr, meta_lr, with_meta=True))

  start = time.perf_counter()
  meta = meta_jit.lower(state, x1, y1, x2, y2).compile()
  compile_s = time.perf_counter() - start
  plain = plain_jit.lower(state, x1, y1).compile()

  def plain_iteration(s):
    s, _ = plain(s, x1, y1)
    s, _ = plain(s, x2, y2)
    return s

  def l2w_iteration(s):
    s, _ = meta(s, x1, y1, x2, y2)
    s, _ = meta(s, x2, y2, x1, y1)
    return s

  jax.block_until_ready(plain_iteration(state))  # warm up
  jax.block_until_ready(l2w_iteration(state))

  plain_times, l2w_times = [], []
  for _ in range(_ITERS.value):  # interleaved, so load shifts hit both
    state, t = _timed(plain_iteration, state)
    plain_times.append(t)
    state, t = _timed(l2w_iteration, state)
    l2w_times.append(t)
  plain_s = statistics.median(plain_times)
  l2w_s = statistics.median(l2w_times)
  mesh_plain_s, mesh_l2w_s, mesh_l2w_first_s = _time_training_iterations(
      learner, state, np.asarray(images), np.asarray(labels), lr, meta_lr)
  print(json.dumps({'plain_s': round(plain_s, 4), 'l2w_s': round(l2w_s, 4),
                    'ratio': round(l2w_s / plain_s, 3),
                    'mesh_plain_s': round(mesh_plain_s, 4),
                    'mesh_l2w_s': round(mesh_l2w_s, 4),
                    'mesh_ratio': round(mesh_l2w_s / mesh_plain_s, 3),
                    'compile_s': round(compile_s, 2),
                    'mesh_l2w_first_call_s': round(mesh_l2w_first_s, 2),
                    'batch_size': _BATCH.value, 'devices': _DEVICES.value}))


def _time_training_iterations(learner, state, images, labels, lr, meta_lr):
  """Median seconds of the loop's uniform and L2W iterations on the mesh,
  and the seconds of the L2W iteration's first call (its compilation and
  one run)."""
  mesh = parallel.make_mesh(_DEVICES.value)
  runs, first_call_s = {}, {}
  for method in ('uniform', 'l2w'):
    iteration = step_lib.make_iteration(method, learner, mesh)
    own = jax.device_put(jax.tree_util.tree_map(jnp.copy, state),
                         parallel.replicated(mesh))  # donated, so a copy
    start = time.perf_counter()
    own, _ = iteration(own, images, labels, lr, meta_lr, True)  # compiles
    runs[method] = [iteration, jax.block_until_ready(own)]
    first_call_s[method] = time.perf_counter() - start
  times = {method: [] for method in runs}
  for _ in range(_ITERS.value):
    for method, run in runs.items():
      (run[1], _), seconds = _timed(run[0], run[1], images, labels, lr,
                                    meta_lr, True)
      times[method].append(seconds)
  return (statistics.median(times['uniform']), statistics.median(times['l2w']),
          first_call_s['l2w'])


if __name__ == '__main__':
  app.run(main)
