"""Running the original's reference fixtures against this implementation."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from l2w_jax.reference.fixtures import (Check, Fixture, FixtureError,
                                        NotCompared, open_fixture)


def _runners() -> dict[str, Callable]:
  # pylint: disable=g-import-not-at-top
  from l2w_jax.reference.dynamic_eval import run_dynamic_eval_fixture
  from l2w_jax.reference.forward import run_forward_fixture
  from l2w_jax.reference.gradients import (run_boostnet_gradients_fixture,
                                           run_ge_gradients_fixture)
  from l2w_jax.reference.imta_stage2 import run_imta_stage2_fixture
  from l2w_jax.reference.l2w_iteration import run_l2w_iteration_fixture
  from l2w_jax.reference.l2w_training import run_l2w_training_fixture
  return {'forward': run_forward_fixture,
          'l2w_iteration': run_l2w_iteration_fixture,
          'l2w_training': run_l2w_training_fixture,
          'dynamic_eval': run_dynamic_eval_fixture,
          'ge_gradients': run_ge_gradients_fixture,
          'boostnet_gradients': run_boostnet_gradients_fixture,
          'imta_stage2': run_imta_stage2_fixture}


@dataclasses.dataclass
class FixtureResult:
  """What running one fixture produced."""
  fixture: Fixture
  computed: dict[str, np.ndarray]
  checks: list[Check]
  not_compared: list[NotCompared] = dataclasses.field(default_factory=list)

  @property
  def compared(self) -> bool:
    return bool(self.checks)

  @property
  def passed(self) -> bool:
    return all(c.passed for c in self.checks)

  def summary(self) -> dict:
    out = {
        'fixture': self.fixture.path,
        'kind': self.fixture.kind,
        'passed': self.passed,
        'compared': self.compared,
        'checks': {c.name: c.as_json() for c in self.checks},
        'not_compared': {n.name: n.reason for n in self.not_compared},
    }
    worst = self.worst_per_iteration()
    if worst:
      out['worst_per_iteration'] = worst
    return out

  def worst_per_iteration(self) -> dict:
    """For checks named `iterationN/...`: per iteration, the check closest
    to its tolerance (largest error / tolerance; exact checks count only
    when they fail)."""
    worst = {}
    for check in self.checks:
      head, _, rest = check.name.partition('/')
      if not head.startswith('iteration') or not rest:
        continue
      ratio = (check.error / check.tolerance if check.tolerance > 0 else
               (0.0 if check.error == 0 else float('inf')))
      if head not in worst or ratio > worst[head][0]:
        worst[head] = (ratio, check)
    return {head: {'check': c.name[len(head) + 1:], 'error': float(c.error),
                   'tolerance': c.tolerance}
            for head, (_, c) in worst.items()}

  def save(self, path: str) -> None:
    """Writes the fixture's inputs plus everything computed, as a new fixture."""
    import json  # pylint: disable=g-import-not-at-top
    inputs = {k: v for k, v in self.fixture.arrays.items()
              if not k.startswith('expected')}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    np.savez(path, config_json=np.array(json.dumps(self.fixture.config)),
             **inputs, **self.computed)


def run_fixture(fixture: Fixture | str) -> FixtureResult:
  """Runs what the fixture describes; compares with its expected entries."""
  if not isinstance(fixture, Fixture):
    fixture = open_fixture(fixture)
  runners = _runners()
  if fixture.kind not in runners:
    raise FixtureError(f'{fixture.name}: unknown fixture kind '
                       f'{fixture.kind!r}; this version runs {sorted(runners)}')
  computed, results = runners[fixture.kind](fixture)
  checks = [c for c in results if isinstance(c, Check)]
  not_compared = [c for c in results if isinstance(c, NotCompared)]
  if not fixture.has_expected():
    checks, not_compared = [], []
  return FixtureResult(fixture, computed, checks, not_compared)


def needs_float64(paths) -> bool:
  """Whether any of the fixtures asks for float64 (x64 must be on first)."""
  for path in paths:
    try:
      if open_fixture(path).config.get('compute_dtype') == 'float64':
        return True
    except FixtureError:
      continue
  return False
