"""Resuming a run without a person watching it.

A restart script reruns the same command after every preemption or crash.
On each start the run:

* refuses a workdir that holds a run of another configuration (the config
  is stored with every checkpoint), naming the fields that differ, unless
  `overwrite` moves that run aside first;
* resumes from the newest checkpoint that can be read; one that cannot (a
  truncated file, a half-finished copy) is moved aside to
  `<workdir>/bad_checkpoints/` with a line saying so, and the next older one
  is tried. A checkpoint whose arrays are intact but do not fit the model
  (the same config, another version of the code) stops the run instead, so
  that a code change never silently restarts it. Nothing is ever deleted.

Only the fields in RESUMABLE_FIELDS may change between the run that wrote a
checkpoint and the run that resumes it.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections

from l2w_jax import paths
from l2w_jax.training.checkpoint import CheckpointError

# Fields that may differ on resume: how long the run goes on, how often it
# logs, checkpoints and evaluates, how it evaluates, where the data and
# processes are, how the convolutions are differentiated (the same values). Everything else (model, method, optimizer, schedule shape,
# data order via `seed`, batch size) must match the checkpoint.
RESUMABLE_FIELDS = (
    'train.num_steps', 'train.epochs', 'train.log_every_steps',
    'train.checkpoint_every_steps', 'train.keep_checkpoints',
    'train.eval_every_epochs', 'train.init_from', 'eval.*',
    'dataset.data_dir', 'dataset.manual_dir', 'dataset.skip_corrupt',
    'distributed.*',
    'model.conv_gradients')
# Exceptions to the patterns above: eval.protocol decides which images train
# (dataset.holdout follows it), so a resumed run keeps it.
FIXED_FIELDS = ('eval.protocol',)

BAD_CHECKPOINTS = 'bad_checkpoints'


class ConfigMismatch(ValueError):
  """The workdir holds a run of another configuration."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def _resumable(path: str) -> bool:
  if path in FIXED_FIELDS:
    return False
  return any(fnmatch.fnmatchcase(path, pattern)
             for pattern in RESUMABLE_FIELDS)


def config_differences(stored_json: str, config: ml_collections.ConfigDict
                       ) -> list[tuple[str, Any, Any]]:
  """(field, checkpoint's value, config's value) for every field outside
  RESUMABLE_FIELDS whose values differ, in field order. Fields that only one
  side has (a run written by an older version of the code) are not
  compared."""
  stored = _flatten(json.loads(stored_json))
  current = _flatten(json.loads(config.to_json()))
  return [(path, stored[path], current[path])
          for path in sorted(set(stored) & set(current))
          if not _resumable(path) and stored[path] != current[path]]


def mismatch_message(workdir: str, differences) -> str:
  """One line: which fields differ and how to proceed."""
  fields = '; '.join(f'{path} = {json.dumps(old)} in the checkpoint, '
                     f'{json.dumps(new)} now' for path, old, new in differences)
  return (f'{workdir} holds a run of another configuration ({fields}): '
          'rerun with the configuration that wrote it to resume it, use '
          'another --workdir, or pass --overwrite to move that run aside and '
          'start afresh')


def _timestamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y%m%dT%H%M%S%fZ')


def barrier(name: str) -> None:
  """Waits for every process (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def move_checkpoint_aside(checkpoint_dir: str, workdir: str) -> str:
  """Moves a checkpoint directory (`<workdir>/checkpoints/<step>`) to
  `<workdir>/bad_checkpoints/<step>-<UTC time>` on process 0, and waits
  until it is done.

  Args:
    checkpoint_dir: the checkpoint, a local path or a gs:// URL.
    workdir: the run's workdir.

  Returns:
    The new path (on every process).
  """
  name = f'{paths.split(checkpoint_dir)[1]}-{_timestamp()}'
  bad = paths.join(workdir, BAD_CHECKPOINTS)
  if jax.process_index() == 0:
    paths.move_into(checkpoint_dir, bad, name)
  barrier('l2w_jax: bad checkpoint moved aside')
  return paths.join(bad, name)


def move_run_aside(workdir: str) -> str | None:
  """Moves a non-empty `workdir` to `<workdir>.replaced-<UTC time>` on
  process 0 so that a new run starts there.

  Args:
    workdir: a local path or a gs:// URL.

  Returns:
    The new path, or None if there was nothing to move.
  """
  workdir = paths.absolute(workdir)
  if not paths.is_dir(workdir) or not paths.listdir(workdir):
    return None
  target = f'{workdir}.replaced-{_timestamp()}'
  if jax.process_index() == 0:
    paths.rename(workdir, target)
  barrier('l2w_jax: old run moved aside')
  return target


def newest_meta(checkpointer, workdir: str, log=print):
  """(step, meta) of the newest checkpoint whose metadata can be read, or
  (None, None); unreadable ones are moved aside (`move_checkpoint_aside`)."""
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      return step, checkpointer.read_meta(step)
    except CheckpointError as e:
      _set_aside(checkpointer, step, workdir, e, log)
  return None, None


def _set_aside(checkpointer, step: int, workdir: str, error, log) -> None:
  moved = move_checkpoint_aside(checkpointer.path(step), workdir)
  checkpointer.reload()
  log(f'checkpoint {step} cannot be read ({error.reason}); moved it to '
      f'{moved} and trying the next older one')


def check_resumable(checkpointer, config, workdir: str, log=print) -> None:
  """Raises ConfigMismatch (one line) unless the newest readable
  checkpoint was written with `config` up to RESUMABLE_FIELDS."""
  step, meta = newest_meta(checkpointer, workdir, log)
  if step is None or 'config' not in meta:
    return
  differences = config_differences(meta['config'], config)
  if differences:
    raise ConfigMismatch(mismatch_message(workdir, differences))


def restore_newest(checkpointer, template, config, workdir: str, log=print):
  """(state, meta) of the newest checkpoint that restores; (None, None) if
  none is left. Call it after `check_resumable` (which `train_and_evaluate`
  runs before compiling); checkpoints that cannot be restored are moved
  aside one by one, and the next newest is checked against `config`
  before it is restored."""
  while True:
    step = checkpointer.latest_step()
    if step is None:
      return None, None
    try:
      return checkpointer.restore(template, step)
    except CheckpointError as e:
      if checkpointer.arrays_fit(step, template) is False:
        # Intact but of another model: written by another version of the
        # code. Moving it aside would silently restart the run.
        raise CheckpointError(
            f'{checkpointer.path(step)} holds arrays that do not fit the '
            'model this code builds from the same config (written by '
            f'another version of the code?): {e.reason}. Nothing was moved '
            'or deleted; resume it with the code that wrote it, or pass '
            '--overwrite to move the run aside and start afresh',
            e.reason) from e
      _set_aside(checkpointer, step, workdir, e, log)
      check_resumable(checkpointer, config, workdir, log)
