"""Timing the cascade against the full network on a shared machine: paired
measurements (the variants take turns within each repeat), the cascade and
the single-image cascade against the full network, and how long each exit
takes to return."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np


def _seconds_per_image(fn, batches: Sequence[np.ndarray]) -> float:
  """Wall-clock seconds per image of one pass of fn over the batches."""
  n = sum(b.shape[0] for b in batches)
  start = time.perf_counter()
  for batch in batches:
    jax.block_until_ready(fn(batch))
  return (time.perf_counter() - start) / n


def paired_times(fns: dict, batches: dict, repeats: int = 7) -> dict:
  """Seconds per image of each fns[name] over batches[name], the functions
  taking turns within each repeat so that a change of load on a shared
  machine hits all of them alike: {name: median seconds}, and for every
  name after the first {name + '_speedup': the median over repeats of the
  first function's time / this one's}. One untimed pass of each comes
  first, so that compiling is not timed."""
  names = list(fns)
  runs = {name: [] for name in names}
  for name in names:  # untimed: compiles whatever the passes will use
    _seconds_per_image(fns[name], batches[name])
  for _ in range(repeats):
    for name in names:
      runs[name].append(_seconds_per_image(fns[name], batches[name]))
  out = {name: float(np.median(runs[name])) for name in names}
  for name in names[1:]:
    out[name + '_speedup'] = float(np.median(
        np.asarray(runs[names[0]]) / np.asarray(runs[name])))
  return out


def compare_with_full_network(full, cascade, single, batches, singles,
                              repeats: int = 7) -> dict[str, float]:
  """Seconds per image of the full network and of the cascades, in batches
  and one image at a time, and the speed-ups (median over repeats of the
  paired ratios); each pair takes turns within every repeat."""
  in_batches = paired_times({'full': full, 'cascade': cascade},
                            {'full': batches, 'cascade': batches}, repeats)
  one_by_one = paired_times({'full': full, 'cascade': single},
                            {'full': singles, 'cascade': singles}, repeats)
  return {
      'full_batch_s': in_batches['full'],
      'cascade_batch_s': in_batches['cascade'],
      'batch_speedup': in_batches['cascade_speedup'],
      'full_single_s': one_by_one['full'],
      'cascade_single_s': one_by_one['cascade'],
      'single_speedup': one_by_one['cascade_speedup'],
  }


def forced_exit_thresholds(num_exits: int, exit_index: int) -> np.ndarray:
  """Thresholds (K,) under which every sample leaves at `exit_index`
  (0-based): +inf before it (nobody is confident enough), -inf at it."""
  thresholds = np.full((num_exits,), np.inf, np.float32)
  thresholds[exit_index] = -np.inf
  return thresholds


def exit_return_times(full, cascade, batches: Sequence[np.ndarray],
                      repeats: int = 7) -> tuple[list[float], float]:
  """Seconds per image of `cascade` (a Cascade or a SingleImageCascade)
  when every image leaves at exit k, for each k (the time of each exit's
  early return), and of `full` (the full network), which takes turns with
  every exit's runs; the cascade's thresholds are restored afterwards."""
  saved = cascade.thresholds
  num_exits = cascade.model.num_exits
  forced = [forced_exit_thresholds(num_exits, k) for k in range(num_exits)]

  current = [None]  # the exit the thresholds force now

  def at_exit(k):
    def run(batch):
      if current[0] != k:  # once per pass, not in every timed call
        cascade.thresholds, current[0] = forced[k], k
      return cascade(batch)
    return run

  fns = {'full': full, **{f'exit{k}': at_exit(k) for k in range(num_exits)}}
  try:
    times = paired_times(fns, {name: batches for name in fns}, repeats)
  finally:
    cascade.thresholds = saved
  return [times[f'exit{k}'] for k in range(num_exits)], times['full']
