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

import os
from typing import Any

from absl import logging
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that exists but cannot be used."""


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

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Writes `state` at `step` (no-op if that step is already saved)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, template, step: int | None = None):
    """(state, meta) of `step` (default: latest) shaped like `template`.

    Raises CheckpointError naming the checkpoint and the way out when it
    cannot be read or does not fit the configured model.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    path = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(template),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      others = [s for s in self.all_steps() if s != step]
      fallback = (f'move {path} aside to resume from step {max(others)}'
                  if others else 'start again in a new --workdir')
      raise CheckpointError(
          f'the checkpoint at {path} cannot be restored ({type(e).__name__}: '
          f'{str(e)[:500]}). It is corrupt or was written by a different '
          f'configuration (model, weight net or optimizer). Nothing was '
          f'deleted; {fallback}, or run with the configuration that wrote '
          'it.') from e
    logging.info('restored checkpoint %s', path)
    return restored['state'], restored['meta']

  def close(self) -> None:
    self._manager.close()
