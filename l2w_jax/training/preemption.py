"""Stopping a run cleanly on SIGTERM or Ctrl-C, on one process or all."""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class Preemption:
  """Set by SIGTERM or Ctrl-C (SIGINT) (or, for tests, at a given step):
  save and stop.

  With several processes the decision must be collective (a process that
  stopped alone would leave the others waiting in the next all-reduce): JAX's
  preemption service catches SIGTERM on any host, and every process stops
  after the same iteration (`reached_preemption_sync_point`). Its own SIGTERM
  handler must stay in place, so no Python handler is installed then.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, at_step: int | None = None):
    self.requested = False
    self._at_step = at_step
    self._previous = {}
    self._collective = jax.process_count() > 1

  def install(self) -> None:
    if self._collective:
      return
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      # A second Ctrl-C does not wait for the iteration to finish.
      raise KeyboardInterrupt
    print(f'{signal.Signals(signum).name}: saving a checkpoint after this '
          'iteration and stopping', flush=True)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after iteration `step`; call it once per
    iteration, on every process."""
    if self._collective and multihost_utils.reached_preemption_sync_point(
        step):
      print(f'SIGTERM on some process: every process saves iteration {step} '
            'and stops', flush=True)
      self.requested = True
    return self.requested or (self._at_step is not None and
                              step >= self._at_step)
