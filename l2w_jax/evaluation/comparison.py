"""Several seeds of several methods: mean and spread of their curves."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class SeedSummary:
  """One method over seeds: per budget (39) and per exit (K), the mean and
  the standard deviation over seeds (ddof 0) of MFLOPs and test top-1."""
  label: str
  num_seeds: int
  budget_mflops: np.ndarray  # (39,) mean over seeds
  budget_top1: np.ndarray  # (39,)
  budget_top1_std: np.ndarray  # (39,)
  exit_mflops: np.ndarray  # (K,)
  exit_top1: np.ndarray  # (K,)
  exit_top1_std: np.ndarray  # (K,)


def summarise_seeds(results: Sequence[dict], label: str) -> SeedSummary:
  """results.json dicts of one method's runs (one per seed) -> SeedSummary.

  Budgets are matched by `budget_index`; every run must have the same ones
  and the same number of exits (ValueError otherwise).
  """
  if not results:
    raise ValueError(f'{label}: no runs to summarise')
  budgets = [sorted(r['budgeted'], key=lambda row: row['budget_index'])
             for r in results]
  indices = [[row['budget_index'] for row in b] for b in budgets]
  exits = {len(r['anytime']['top1']) for r in results}
  if any(i != indices[0] for i in indices) or len(exits) != 1:
    raise ValueError(f'{label}: runs with different budgets or exits')
  top1 = np.array([[row['test_top1'] for row in b] for b in budgets])
  mflops = np.array([[row['mflops'] for row in b] for b in budgets])
  exit_top1 = np.array([r['anytime']['top1'] for r in results])
  return SeedSummary(
      label=label, num_seeds=len(results),
      budget_mflops=mflops.mean(axis=0), budget_top1=top1.mean(axis=0),
      budget_top1_std=top1.std(axis=0),
      exit_mflops=np.asarray(results[0]['mflops_per_exit']),
      exit_top1=exit_top1.mean(axis=0), exit_top1_std=exit_top1.std(axis=0))
