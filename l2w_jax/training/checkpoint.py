"""Orbax checkpoints of the whole training state, with automatic resume.

A checkpoint holds the `TrainState` (backbone parameters and batch
statistics, both optimizer states, the weight net, the iteration count) and
JSON metadata (data position, config). The data pipeline is a deterministic
function of (seed, epoch, position in epoch), and the iteration count gives
both, so nothing else is needed to resume mid-epoch. Orbax writes to a
temporary directory and renames it when complete, so a crash while saving
never replaces a good checkpoint.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be used, or cannot be written.
  `reason` is the underlying error in one short line."""

  def __init__(self, message: str, reason: str = ''):
    super().__init__(message)
    self.reason = reason or message


def _one_line(error: Exception, limit: int = 300) -> str:
  text = ' '.join(f'{type(error).__name__}: {error}'.split())
  return text if len(text) <= limit else text[:limit] + '...'


class Checkpointer:
  """Saves and restores `TrainState`s under `directory` (keeps the last few)."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False),
        item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def path(self, step: int) -> str:
    """The directory of checkpoint `step`."""
    return os.path.join(self.directory, str(step))

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
    return list(self._manager.all_steps())

  def arrays_fit(self, step: int, template) -> bool | None:
    """Whether checkpoint `step` stores arrays of the shapes and dtypes of
    `template`'s leaves (compared as multisets, so independent of how
    paths are spelled); None if its array metadata cannot be read."""
    try:
      stored = ocp.StandardCheckpointer().metadata(
          os.path.join(self.path(step), 'state'))
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
    """Writes `state` at `step` (no-op if that step is already saved)."""
    if step in self._manager.all_steps():
      return
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      kept = self.all_steps()
      raise CheckpointError(
          f'cannot write checkpoint {step} to {self.path(step)} '
          f'({_one_line(e)}). Orbax writes to a temporary directory first, so '
          f'the earlier checkpoints ({kept or "none"}) are untouched; make '
          f'{self.directory} writable or free space, then rerun the same '
          'command to resume', _one_line(e)) from e

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
    self._manager.close()
