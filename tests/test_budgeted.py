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


def _assert_budget_matches_original(result, i, thresholds, val, test,
                                    flops):
  """Budget i of `result` against the original's loop with `thresholds`;
  `val` and `test` are (probabilities (K, N, C), labels (N,))."""
  (val_probs, val_labels), (test_probs, test_labels) = val, test
  val_acc, _ = original_with_threshold(val_probs.max(2), val_probs.argmax(2),
                                       val_labels, thresholds, flops)
  test_acc, test_flops = original_with_threshold(
      test_probs.max(2), test_probs.argmax(2), test_labels, thresholds, flops)
  assert result.val_acc[i] == val_acc
  assert result.test_acc[i] == test_acc
  assert result.test_flops[i] == pytest.approx(test_flops, rel=1e-12)


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
  val_conf = val.max(2)
  sentinels = 0
  for i, q in enumerate(budgeted.budget_proportions(exits)):
    thresholds = original_find_threshold(val_conf, q)
    np.testing.assert_array_equal(result.thresholds[i], thresholds)
    sentinels += int(np.sum(thresholds == np.float32(1e8)))
    _assert_budget_matches_original(result, i, thresholds, (val, val_labels),
                                    (test, test_labels), flops)
  if exits >= 5:  # small quotas: the "nobody exits here" case is exercised
    assert sentinels > 0


def test_rows_for_results_json():
  rng = np.random.default_rng(0)
  val, labels = _outputs(rng, 3, 80, 4, False)
  test, test_labels = _outputs(rng, 3, 50, 4, False)  # counts are test's
  rows = budgeted.budgeted_evaluation_from_probs(
      val, labels, test, test_labels, [1e6, 2e6, 3e6]).rows()
  assert len(rows) == 39 and rows[0]['budget_index'] == 1
  assert set(rows[0]) == {'budget_index', 'val_top1', 'test_top1', 'mflops',
                          'thresholds', 'test_exit_counts'}
  assert all(1.0 <= r['mflops'] <= 3.0 for r in rows)
  for row in rows:
    counts = row['test_exit_counts']
    assert len(counts) == 3 and sum(counts) == 50
    # The expected cost the counts imply is the one reported.
    implied = sum(float(np.float32(c) / np.float32(50)) * f
                  for c, f in zip(counts, (1.0, 2.0, 3.0)))
    assert row['mflops'] == pytest.approx(implied, rel=1e-12)
    assert row['thresholds'][-1] == float(budgeted.ALWAYS_EXIT)
  # The smallest budget sends most images out early, the largest late.
  assert rows[0]['test_exit_counts'][0] > rows[-1]['test_exit_counts'][0]
  assert rows[0]['test_exit_counts'][2] < rows[-1]['test_exit_counts'][2]


# The message of check_probabilities' range check only (the sum check and the
# shape checks say other things).
RANGE_MESSAGE = r'values must be probabilities in \[0, 1\]'


def test_bad_input_is_refused():
  rng = np.random.default_rng(0)
  probs, labels = _outputs(rng, 3, 20, 4, False)
  assert (probs * 3).max() > 1  # logits-like: out of range before summing
  with pytest.raises(ValueError, match=RANGE_MESSAGE):
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


def _with_row(probs, row):
  """`probs` with its first sample at exit 0 replaced by `row`."""
  probs = probs.copy()
  probs[0, 0] = np.asarray(row, dtype=np.float32)
  return probs


# Rows the range check alone must refuse: each sums to 1 within the sum
# check's tolerance (1e-3) or is NaN (whose sum the sum check lets through).
OUT_OF_RANGE_ROWS = {
    'negative': [0.6, 0.6, -0.2, 0.0],
    'tiny_negative': [-0.0005, 1.0, 0.0, 0.0],
    'above_one': [1.0005, 0.0, 0.0, 0.0],
    'above_one_and_negative': [1.5, -0.5, 0.0, 0.0],
    'nan': [np.nan, 0.5, 0.25, 0.25],
    'inf': [np.inf, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize('case', sorted(OUT_OF_RANGE_ROWS))
@pytest.mark.parametrize('which', ['held-out', 'test'])
def test_values_outside_0_1_are_refused_by_the_range_check(case, which):
  """Only the [0, 1] / finiteness check can catch these inputs."""
  rng = np.random.default_rng(1)
  probs, labels = _outputs(rng, 3, 20, 4, False)
  bad = _with_row(probs, OUT_OF_RANGE_ROWS[case])
  sums = bad.sum(axis=2, dtype=np.float64)
  if case == 'nan':
    assert np.isnan(sums[0, 0])
  elif case != 'inf':
    assert np.max(np.abs(sums - 1.0)) <= 1e-3  # the sum check is satisfied
  args = ((bad, labels, probs, labels) if which == 'held-out' else
          (probs, labels, bad, labels))
  with pytest.raises(ValueError, match=f'{which} probabilities: '
                     f'{RANGE_MESSAGE}'):
    budgeted.budgeted_evaluation_from_probs(*args, [1, 2, 3])
  with pytest.raises(ValueError, match=RANGE_MESSAGE):
    budgeted.check_probabilities(bad, 'x')
  budgeted.check_probabilities(probs, 'x')  # the untouched input is fine


def test_probabilities_at_the_range_ends_are_accepted():
  """Exactly 0 and exactly 1 are probabilities (one-hot outputs)."""
  probs = np.zeros((2, 3, 4), np.float32)
  probs[:, :, 1] = 1.0
  budgeted.check_probabilities(probs, 'one-hot')


def _tied_outputs(rng, exits, n, classes, tied_exit, num_tied):
  """Probabilities where `num_tied` samples share the top confidence (0.7) at
  `tied_exit`; every other confidence there is at most 0.6 and distinct."""
  probs = rng.dirichlet(np.full(classes, 0.3), size=(exits, n))
  low = 0.5 * rng.dirichlet(np.full(classes, 2.0), size=n) + 0.5 / classes
  probs[tied_exit] = low  # max <= 0.5 + 0.5 / classes = 0.6
  tied = rng.choice(n, size=num_tied, replace=False)
  rest = 0.3 / (classes - 1)
  for i in tied:  # the same values, the 0.7 at a random class
    row = np.full(classes, rest)
    row[rng.integers(classes)] = 0.7
    probs[tied_exit, i] = row
  labels = rng.integers(0, classes, size=n)
  return probs.astype(np.float32), labels


def _quota_exceeds_free(confidence, proportions, thresholds):
  """Exits (k < K - 1, quota >= 1) whose quota exceeds the samples no earlier
  exit took, and exits whose quota equals them, given the thresholds."""
  num_exits, n = confidence.shape
  taken = np.zeros(n, bool)
  exceeds, equals = [], []
  for k in range(num_exits - 1):
    quota = math.floor(np.float32(n) * np.float32(proportions[k]))
    free = int(n - taken.sum())
    if quota >= 1 and quota > free:
      exceeds.append(k)
    if quota >= 1 and quota == free:
      equals.append(k)
    taken = taken | (confidence[k] >= thresholds[k])
  return exceeds, equals


@pytest.mark.parametrize('exits,tied_exit,num_tied', [(4, 0, 88),
                                                      (4, 1, 90),
                                                      (3, 0, 95)])
def test_heavy_ties_leave_fewer_samples_than_the_next_quota(exits, tied_exit,
                                                            num_tied):
  """A tie takes (almost) everyone, so a later exit's quota exceeds the
  samples left: its threshold must stay 1e8, as in the original's loop."""
  rng = np.random.default_rng(10 * exits + tied_exit)
  n_val = 100
  val, val_labels = _tied_outputs(rng, exits, n_val, 5, tied_exit, num_tied)
  test, test_labels = _tied_outputs(rng, exits, 60, 5, tied_exit, 40)
  flops = np.cumsum(rng.uniform(1e6, 3e6, size=exits))
  result = budgeted.budgeted_evaluation_from_probs(val, val_labels, test,
                                                   test_labels, flops)
  val_conf = val.max(2)
  assert np.sum(val_conf[tied_exit] == np.float32(0.7)) == num_tied
  assert np.all(np.sort(val_conf[tied_exit])[:n_val - num_tied] <= 0.6)
  exceeded, equalled, exits_after = 0, 0, 0
  for i, q in enumerate(budgeted.budget_proportions(exits)):
    thresholds = original_find_threshold(val_conf, q)
    np.testing.assert_array_equal(result.thresholds[i], thresholds)
    exceeds, equals = _quota_exceeds_free(val_conf, q, thresholds)
    for k in exceeds:  # nobody exits there
      assert thresholds[k] == np.float32(1e8)
    exceeded += len(exceeds)
    equalled += len(equals)
    # a later (not last) exit still gets a real threshold after a sentinel
    exits_after += sum(int(thresholds[j] < 1) for k in exceeds
                       for j in range(k + 1, exits - 1))
    _assert_budget_matches_original(result, i, thresholds, (val, val_labels),
                                    (test, test_labels), flops)
  assert exceeded > 0  # the quota-exceeds-free branch was reached
  if (exits, tied_exit) == (4, 0):
    assert equalled > 0  # and the quota == free boundary too
    assert exits_after > 0
