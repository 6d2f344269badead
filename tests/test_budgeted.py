"""Budgeted evaluation against the original's per-sample loops."""

import math

import numpy as np
import pytest

from l2w_jax.evaluation import budgeted


def original_find_threshold(max_preds, proportions):
  """The original's Tester.dynamic_eval_find_threshold, stated plainly."""
  n_stage, n = max_preds.shape
  order = [sorted(range(n), key=lambda i: -max_preds[k][i])
           for k in range(n_stage)]
  filtered = [0] * n
  thresholds = [np.float32(1e8)] * n_stage
  for k in range(n_stage - 1):
    out_n = math.floor(np.float32(n) * np.float32(proportions[k]))
    count = 0
    for i in order[k]:
      if filtered[i] == 0:
        count += 1
        if count == out_n:
          thresholds[k] = max_preds[k][i]
          break
    for i in range(n):
      filtered[i] += int(max_preds[k][i] >= thresholds[k])
  thresholds[-1] = np.float32(-1e8)
  return np.array(thresholds, np.float32)


def original_with_threshold(max_preds, argmax, labels, thresholds, flops):
  n_stage, n = max_preds.shape
  acc, exits = 0, [0] * n_stage
  for i in range(n):
    for k in range(n_stage):
      if max_preds[k][i] >= thresholds[k]:
        acc += int(labels[i] == argmax[k][i])
        exits[k] += 1
        break
  expected = sum(float(np.float32(exits[k]) / np.float32(n)) * flops[k]
                 for k in range(n_stage))
  return acc * 100.0 / n, expected


def _outputs(rng, exits, n, classes, ties):
  probs = rng.dirichlet(np.full(classes, 0.3), size=(exits, n))
  probs = probs.astype(np.float32)
  if ties:  # groups of samples with identical outputs
    probs[:, 1:n // 2:2] = probs[:, 0:n // 2 - 1:2]
  labels = rng.integers(0, classes, size=n)
  return probs, labels


@pytest.mark.parametrize('exits,n_val,n_test,ties', [(5, 300, 200, True),
                                                     (3, 97, 150, False),
                                                     (7, 400, 50, True)])
def test_matches_the_original_loops(exits, n_val, n_test, ties):
  rng = np.random.default_rng(exits)
  val, val_labels = _outputs(rng, exits, n_val, 10, ties)
  test, test_labels = _outputs(rng, exits, n_test, 10, ties)
  flops = np.cumsum(rng.uniform(1e6, 3e6, size=exits))
  result = budgeted.budgeted_evaluation_from_probs(val, val_labels, test,
                                                   test_labels, flops)
  val_conf, val_pred = val.max(2), val.argmax(2)
  test_conf, test_pred = test.max(2), test.argmax(2)
  sentinels = 0
  for i, q in enumerate(budgeted.budget_proportions(exits)):
    thresholds = original_find_threshold(val_conf, q)
    np.testing.assert_array_equal(result.thresholds[i], thresholds)
    sentinels += int(np.sum(thresholds == np.float32(1e8)))
    val_acc, _ = original_with_threshold(val_conf, val_pred, val_labels,
                                         thresholds, flops)
    test_acc, test_flops = original_with_threshold(
        test_conf, test_pred, test_labels, thresholds, flops)
    assert result.val_acc[i] == val_acc
    assert result.test_acc[i] == test_acc
    assert result.test_flops[i] == pytest.approx(test_flops, rel=1e-12)
  if exits >= 5:  # small quotas: the "nobody exits here" case is exercised
    assert sentinels > 0


def test_rows_for_results_json():
  rng = np.random.default_rng(0)
  val, labels = _outputs(rng, 3, 50, 4, False)
  rows = budgeted.budgeted_evaluation_from_probs(
      val, labels, val, labels, [1e6, 2e6, 3e6]).rows()
  assert len(rows) == 39 and rows[0]['budget_index'] == 1
  assert set(rows[0]) == {'budget_index', 'val_top1', 'test_top1', 'mflops'}
  assert all(1.0 <= r['mflops'] <= 3.0 for r in rows)


def test_bad_input_is_refused():
  rng = np.random.default_rng(0)
  probs, labels = _outputs(rng, 3, 20, 4, False)
  with pytest.raises(ValueError, match='not logits|probabilities'):
    budgeted.budgeted_evaluation_from_probs(probs * 3, labels, probs, labels,
                                            [1, 2, 3])
  with pytest.raises(ValueError, match='sum to 1'):
    budgeted.budgeted_evaluation_from_probs(probs * 0.5, labels, probs,
                                            labels, [1, 2, 3])
  with pytest.raises(ValueError, match='empty'):
    budgeted.budgeted_evaluation_from_probs(probs[:, :0], labels[:0], probs,
                                            labels, [1, 2, 3])
  with pytest.raises(ValueError, match='one threshold per exit'):
    budgeted.exit_indices(probs.max(2), np.array([0.5, 0.5]))
  with pytest.raises(ValueError, match='one FLOPs figure per exit'):
    budgeted.accuracy_and_flops(probs.max(2), probs.argmax(2), labels,
                                np.array([0.5, 0.5, -1e8]), [1, 2])
