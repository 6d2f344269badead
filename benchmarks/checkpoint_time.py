r"""How long a checkpoint blocks the training loop: synchronous against
asynchronous saves.

  python -m benchmarks.checkpoint_time --config=configs/digits.py \
      --workdir=/tmp/l2w_checkpoint_time [--saves=7]

Saves the config's whole training state (its model, both optimizer states
and the weight net, as initialised) `--saves` times with `Checkpointer`,
once with `asynchronous=False` (the files are written before `save`
returns) and once with `asynchronous=True` (orbax copies the arrays to host
memory and writes them in a background thread). Per mode it times
`blocked_s`, how long `save` took to return (what the loop waits for), and
`on_disk_s`, until `wait_until_finished` returned (the save as a whole);
each save starts with nothing in flight, as in a run whose checkpoints are
further apart than one takes to write. It also times the check that the
state is finite before each save, on the device with one scalar fetched
(`device_finite_check_s`) against copying the state to the host first
(`host_finite_check_s`, what the loop did before). Prints one JSON line of
medians (after one untimed save per mode).
"""

import json
import os
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from configs import common

from l2w_jax import data
from l2w_jax import paths
from l2w_jax.training import divergence
from l2w_jax.training.checkpoint import Checkpointer
from l2w_jax.training.learner import build_learner, init_train_state

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits.py')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/l2w_checkpoint_time',
                               'Where the checkpoints go (local or gs://).')
_SAVES = flags.DEFINE_integer('saves', 7, 'Timed saves per mode.')


def _time_saves(directory: str, state, asynchronous: bool) -> dict:
  """Medians of (seconds until save returned, seconds until on disk)."""
  checkpointer = Checkpointer(directory, keep=2, asynchronous=asynchronous)
  blocked, on_disk = [], []
  try:
    for step in range(_SAVES.value + 1):
      start = time.perf_counter()
      checkpointer.save(step, state, {'step': step})
      returned = time.perf_counter()
      checkpointer.wait_until_finished()
      if step:  # the first creates the directories: not timed
        blocked.append(returned - start)
        on_disk.append(time.perf_counter() - start)
  finally:
    checkpointer.close()
    paths.rmtree(directory)  # this benchmark's own scratch checkpoints
  return {'blocked_s': round(statistics.median(blocked), 4),
          'on_disk_s': round(statistics.median(on_disk), 4)}


def _time_finite_checks(state) -> dict:
  """Medians of the device check (one scalar fetched) and of the host
  check (the whole state fetched, then tested)."""
  leaves = [x for x in jax.tree_util.tree_leaves(state) if divergence.is_float(x)]
  bool(divergence.all_finite(leaves))  # compile
  device, host = [], []
  for _ in range(_SAVES.value):
    start = time.perf_counter()
    bool(divergence.all_finite(leaves))
    device.append(time.perf_counter() - start)
    start = time.perf_counter()
    all(np.all(np.isfinite(x)) for x in jax.device_get(leaves))
    host.append(time.perf_counter() - start)
  return {'device_finite_check_s': round(statistics.median(device), 5),
          'host_finite_check_s': round(statistics.median(host), 5)}


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax's INFO lines per save
  config = common.config_from_flag(_CONFIG)
  learner = build_learner(config)
  state = jax.device_put(init_train_state(
      learner, jax.random.PRNGKey(0), data.data_info(config).image_shape))
  leaves = jax.tree_util.tree_leaves(state)
  out = {'config': config.dataset.name, 'workdir': _WORKDIR.value,
         'state_mb': round(sum(x.nbytes for x in leaves) / 1e6, 3),
         'state_leaves': len(leaves), 'saves': _SAVES.value}
  stamp = f'{os.getpid()}-{int(time.time())}'
  for mode, asynchronous in (('sync', False), ('async', True)):
    out[mode] = _time_saves(paths.join(_WORKDIR.value, f'{mode}-{stamp}'),
                            state, asynchronous)
  out.update(_time_finite_checks(state))
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
