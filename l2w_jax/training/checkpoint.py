"""Orbax checkpoints of the whole training state, with automatic resume.

A checkpoint holds the `TrainState` (backbone parameters and batch
statistics, both optimizer states, the weight net, the iteration count) and
JSON metadata (data position, config). The data pipeline is a deterministic
function of (seed, epoch, position in epoch), and the iteration count gives
both, so nothing else is needed to resume mid-epoch.

Saves are asynchronous: `save` returns once orbax has copied the arrays to
host memory, and the files are written in a background thread while
training goes on. A save in flight is waited for by the next `save`, by
`wait_until_finished` and `latest_step` (so that they tell what is on
disk), and by `close`; a background failure comes out of whichever of
them waits as a one-line `CheckpointError` naming the checkpoint.

A checkpoint counts only once completely written: orbax writes it to a
temporary directory and renames it (locally), or writes its
`commit_success.txt` last (on GCS), so a crash or a failed write while
saving never replaces a good checkpoint. `directory` may be a local path or
a `gs://` URL (`l2w_jax.paths`).
"""

from __future__ import annotations

import collections
import logging as python_logging
import os
import sys
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from l2w_jax import paths


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be used, or cannot be written.
  `reason` is the underlying error in one short line."""

  def __init__(self, message: str, reason: str = ''):
    super().__init__(message)
    self.reason = reason or message


def _one_line(error: Exception, limit: int = 300) -> str:
  text = ' '.join(f'{type(error).__name__}: {error}'.split())
  return text if len(text) <= limit else text[:limit] + '...'


class _OrbaxSaveErrors(python_logging.Filter):
  """Drops orbax's own tracebacks of a failed background save: the failure
  comes out of the next wait as a one-line CheckpointError instead (a run
  stops with one line on stderr, as a failed synchronous save does)."""

  MESSAGES = ('background save thread', 'Save Finalize thread',
              '_SignalingThread.run() raised an exception')

  def filter(self, record: python_logging.LogRecord) -> bool:
    from_orbax = f'{os.sep}orbax{os.sep}' in (record.pathname or '')
    return not (from_orbax and record.levelno >= python_logging.ERROR and
                any(m in str(record.msg) for m in self.MESSAGES))


def _quiet_closed_loop_callbacks() -> None:
  """Drops the "Event loop is closed" errors that TensorStore's remaining
  write callbacks raise (as unraisable exceptions, a traceback each, a
  hundred of them) once a background save has failed and orbax closed its
  event loop; other unraisable exceptions are reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, 'quiet_closed_loop', False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and
            str(error) == 'Event loop is closed'):
      previous(unraisable)

  hook.quiet_closed_loop = True
  sys.unraisablehook = hook


_SAVE_ERRORS = _OrbaxSaveErrors()


def newest_size(directory: str) -> int | None:
  """The bytes of the newest complete checkpoint under `directory` (local;
  orbax names it by its step, a save in progress has another name), None
  if there is none or it cannot be measured."""
  try:
    steps = [int(n) for n in paths.listdir(directory) if n.isdigit()]
  except OSError:
    return None
  return paths.size_of(paths.join(directory, str(max(steps)))) if steps else (
      None)


class Checkpointer:
  """Saves and restores `TrainState`s under `directory` (keeps the last few).

  Args:
    directory: where the checkpoints go, a local path or a `gs://` URL.
    keep: how many of the newest checkpoints are kept.
    asynchronous: whether `save` returns before the files are written
      (orbax's async checkpointing); False writes them before it returns.
  """

  def __init__(self, directory: str, keep: int = 3, *,
               asynchronous: bool = True):
    self.directory = paths.absolute(directory)
    self._in_flight: int | None = None  # the step a background save writes
    self._checkpoint_bytes = 0
    self._closed = False
    if asynchronous:
      logging.get_absl_logger().addFilter(_SAVE_ERRORS)
      _quiet_closed_loop_callbacks()
    self._manager = ocp.CheckpointManager(
        paths.as_path(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=asynchronous),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    """The newest checkpoint on disk (a save in flight is waited for)."""
    self.wait_until_finished()
    return self._manager.latest_step()

  def path(self, step: int) -> str:
    """The directory of checkpoint `step`."""
    return paths.join(self.directory, str(step))

  def reload(self) -> None:
    """Re-reads which checkpoints exist (after one was moved away)."""
    self._manager.reload()

  def read_meta(self, step: int) -> dict[str, Any]:
    """The JSON metadata of checkpoint `step` (data position, config);
    CheckpointError if it cannot be read."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'the metadata of {self.path(step)} cannot be '
                            f'read ({_one_line(e)})', _one_line(e)) from e

  def all_steps(self) -> list[int]:
    """The checkpoints on disk, oldest first (a save in flight is waited
    for)."""
    self.wait_until_finished()
    return list(self._manager.all_steps())

  def arrays_fit(self, step: int, template) -> bool | None:
    """Whether checkpoint `step` stores arrays of the shapes and dtypes of
    `template`'s leaves (compared as multisets, so independent of how
    paths are spelled); None if its array metadata cannot be read."""
    try:
      stored = ocp.StandardCheckpointer().metadata(
          paths.as_path(paths.join(self.path(step), 'state')))
      stored = getattr(stored, 'item_metadata', stored)
      got = collections.Counter(
          (tuple(leaf.shape), str(leaf.dtype))
          for leaf in jax.tree_util.tree_leaves(stored))
    except Exception:  # pylint: disable=broad-except
      return None
    if not got:  # a damaged array store reads as an empty tree
      return None
    want = collections.Counter(
        (tuple(np.shape(leaf)), str(leaf.dtype))
        for leaf in jax.tree_util.tree_leaves(template))
    return got == want

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts writing `state` and `meta` as checkpoint `step` (no-op if that
    step is already saved) and returns once orbax holds a copy of the
    arrays in host memory: `state` may then be changed or donated.

    Args:
      step: the iteration, the checkpoint's name.
      state: the TrainState.
      meta: JSON-serialisable metadata (data position, config).

    Raises:
      CheckpointError: the previous save failed in the background, or this
        one cannot be started (one line: the checkpoint, the reason, that
        the earlier checkpoints are untouched, the way out).
    """
    if step in self.all_steps():  # waits for the previous save
      return
    # What one checkpoint takes, for the message of a full disk.
    self._checkpoint_bytes = sum(
        getattr(leaf, 'nbytes', 0) for leaf in jax.tree_util.tree_leaves(
            state)) + len(repr(meta))
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    self._in_flight = step

  def wait_until_finished(self) -> None:
    """Returns once the save in flight (if any) is on disk.

    Raises:
      CheckpointError: it failed (one line, naming the checkpoint).
    """
    step, self._in_flight = self._in_flight, None
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e

  def _write_error(self, step: int, error: Exception) -> CheckpointError:
    """The CheckpointError of a save of `step` that failed with `error`."""
    try:
      self._manager.reload()  # forget the step that was not written
      kept = list(self._manager.all_steps())
    except Exception:  # pylint: disable=broad-except
      kept = 'unknown'
    reason = _one_line(error)
    # One checkpoint: the newest on disk, else the arrays to be written.
    size = paths.megabytes(newest_size(self.directory) or
                           self._checkpoint_bytes)
    full = paths.out_of_space(error)
    remedy = (f'free at least {size} (one checkpoint) in {self.directory}'
              if full else f'make {self.directory} writable or free space '
              f'there (one checkpoint takes {size})')
    return CheckpointError(
        f'cannot write checkpoint {step} to {self.path(step)} '
        f'({full + ": " if full else ""}{reason}). A '
        'checkpoint counts only once completely written (orbax renames a '
        'temporary directory, or on GCS writes commit_success.txt last), so '
        f'the earlier checkpoints ({kept or "none"}) are untouched; '
        f'{remedy}, then rerun the same command to resume', reason)

  def restore(self, template, step: int | None = None):
    """(state, meta) of `step` (default: latest) shaped like `template`.

    Raises CheckpointError naming the checkpoint and the way out when it
    cannot be read or does not fit the configured model.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    path = self.path(step)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'the checkpoint at {path} cannot be restored ({_one_line(e)}): it '
          'is corrupt, or was written by a different configuration (model, '
          'weight net or optimizer). Nothing was deleted.',
          _one_line(e)) from e
    logging.info('restored checkpoint %s', path)
    return restored['state'], restored['meta']

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads (a
    second call does nothing).

    Raises:
      CheckpointError: the save in flight failed.
    """
    if self._closed:
      return
    self._closed = True
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()
