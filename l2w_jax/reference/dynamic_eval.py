"""Fixtures of kind `dynamic_eval`: the 39-budget evaluation on given softmax
outputs (thresholds on validation, accuracy and expected FLOPs on test)."""

from __future__ import annotations

import numpy as np

from l2w_jax.evaluation.budgeted import budgeted_evaluation_from_probs
from l2w_jax.reference.fixtures import Check, Fixture, relative_error

TOLERANCE = 1e-6  # relative: equal up to float32 rounding

_OUTPUTS = {  # fixture key -> BudgetedResult field
    'expected_val_acc': 'val_acc',
    'expected_test_acc': 'test_acc',
    'expected_test_flops': 'test_flops',
    'expected_thresholds': 'thresholds',
}


def run_dynamic_eval_fixture(fixture: Fixture):
  """Returns (computed entries under the fixture's key names, checks)."""
  fixture.require(['val_probs', 'val_labels', 'test_probs', 'test_labels',
                   'flops'])
  a = fixture.arrays
  result = budgeted_evaluation_from_probs(a['val_probs'], a['val_labels'],
                                          a['test_probs'], a['test_labels'],
                                          a['flops'])
  computed = {key: np.asarray(getattr(result, field), np.float64)
              for key, field in _OUTPUTS.items()}
  checks = [Check(key[len('expected_'):], relative_error(computed[key],
                                                         a[key]), TOLERANCE,
                  'relative')
            for key in _OUTPUTS if key in a]
  return computed, checks
