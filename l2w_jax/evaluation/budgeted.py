"""Budgeted-batch ("dynamic") evaluation of early-exit networks, vectorised.

The rule is the original's (`Tester.dynamic_eval_find_threshold` /
`dynamic_eval_with_threshold` of MSDNet-PyTorch and L2W-DEN), including its
sentinels and tie behaviour:

- budget i = 1..39 sets p = i / 20 and exit proportions q_k ∝ p^k;
- thresholds are searched on a held-out set, exit by exit (k < K): among the
  samples no earlier exit has taken, ordered by their max probability at exit
  k, the threshold is the max probability of the floor(n * q_k)-th (1-based;
  n counts all held-out samples; floor in float32). When that count is 0 or
  exceeds the samples left, the threshold stays 1e8 (nobody exits). Every
  sample whose max probability is >= the threshold then counts as taken, so
  ties can take more than floor(n * q_k). The last exit's threshold is -1e8;
- a sample exits at the first exit whose threshold its max probability
  reaches; accuracy is the percentage of samples whose prediction there is
  right; expected FLOPs sum_k (fraction exiting at k, float32) * flops_k.

Everything works on per-exit max probabilities and predictions (K, N), so a
model's outputs never need to be held as (K, N, classes). The original loops
over samples in Python; this does one partial sort per (budget, exit).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from l2w_jax.meta.weighting import NUM_BUDGETS, exit_proportions

NO_EXIT = np.float32(1e8)
ALWAYS_EXIT = np.float32(-1e8)


def budget_proportions(num_exits: int) -> np.ndarray:
  """(39, K) float32: q_k ∝ p^k for p = 1/20 .. 39/20."""
  return np.stack([exit_proportions(num_exits, i / 20)
                   for i in range(1, NUM_BUDGETS + 1)])


def confidence_and_prediction(probs: np.ndarray) -> tuple[np.ndarray,
                                                         np.ndarray]:
  """Softmax outputs (K, N, C) -> max probability (K, N) float32 and argmax."""
  probs = np.asarray(probs)
  return probs.max(axis=2).astype(np.float32), probs.argmax(axis=2)


def check_probabilities(probs: np.ndarray, name: str) -> None:
  """Raises ValueError unless `probs` (K, N, C) holds softmax outputs."""
  probs = np.asarray(probs)
  if probs.ndim != 3:
    raise ValueError(f'{name}: expected per-exit probabilities of shape '
                     f'(exits, samples, classes), got {probs.shape}')
  if probs.shape[1] == 0:
    raise ValueError(f'{name}: the set is empty; thresholds need held-out '
                     'samples and accuracy needs test samples')
  if not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
    raise ValueError(f'{name}: values must be probabilities in [0, 1] (pass '
                     'softmax outputs, not logits)')
  sums = probs.sum(axis=2, dtype=np.float64)
  worst = float(np.max(np.abs(sums - 1.0)))
  if worst > 1e-3:
    raise ValueError(f'{name}: probabilities of a sample must sum to 1 over '
                     f'the classes (off by up to {worst:.3g}); pass softmax '
                     'outputs')


def _check_confidences(confidence: np.ndarray, name: str) -> None:
  if confidence.ndim != 2 or confidence.shape[1] == 0:
    raise ValueError(f'{name}: expected non-empty (exits, samples) '
                     f'confidences, got shape {confidence.shape}; an empty '
                     'held-out set cannot give thresholds')


def find_thresholds(confidence: np.ndarray,
                    proportions: np.ndarray) -> np.ndarray:
  """Per-exit thresholds (K,) float32 from held-out confidences (K, N)."""
  confidence = np.asarray(confidence, dtype=np.float32)
  _check_confidences(confidence, 'held-out confidences')
  num_exits, n = confidence.shape
  if len(proportions) != num_exits:
    raise ValueError(f'{len(proportions)} exit proportions for {num_exits} '
                     'exits')
  thresholds = np.full((num_exits,), NO_EXIT, dtype=np.float32)
  taken = np.zeros((n,), dtype=bool)
  for k in range(num_exits - 1):
    quota = math.floor(np.float32(n) * np.float32(proportions[k]))
    free = confidence[k][~taken]
    if 1 <= quota <= free.size:
      # The quota-th largest among the samples not taken yet.
      thresholds[k] = -np.partition(-free, quota - 1)[quota - 1]
    taken |= confidence[k] >= thresholds[k]
  thresholds[-1] = ALWAYS_EXIT
  return thresholds


def exit_indices(confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """The exit each sample leaves at: (K, N), (K,) -> (N,) int."""
  confidence = np.asarray(confidence, dtype=np.float32)
  thresholds = np.asarray(thresholds, dtype=np.float32)
  if thresholds.shape != (confidence.shape[0],):
    raise ValueError(f'need one threshold per exit ({confidence.shape[0]}), '
                     f'got shape {thresholds.shape}')
  reaches = confidence >= thresholds[:, None]
  reaches[-1] = True  # the original's last threshold (-1e8) admits everyone
  return np.argmax(reaches, axis=0)


def accuracy_and_flops(confidence: np.ndarray, predictions: np.ndarray,
                       labels: np.ndarray, thresholds: np.ndarray,
                       flops: np.ndarray) -> tuple[float, float]:
  """Accuracy (%) and expected FLOPs of early exiting with `thresholds`."""
  confidence = np.asarray(confidence, dtype=np.float32)
  _check_confidences(confidence, 'confidences')
  num_exits, n = confidence.shape
  flops = np.asarray(flops, dtype=np.float64)
  if flops.shape != (num_exits,):
    raise ValueError(f'need one FLOPs figure per exit ({num_exits}), got '
                     f'shape {flops.shape}')
  exits = exit_indices(confidence, thresholds)
  correct = np.asarray(predictions)[exits, np.arange(n)] == np.asarray(labels)
  counts = np.bincount(exits, minlength=num_exits)
  expected_flops = 0.0
  for k in range(num_exits):  # float32 fractions, as the original
    expected_flops += float(np.float32(counts[k]) / np.float32(n)) * flops[k]
  return int(correct.sum()) * 100.0 / n, expected_flops


@dataclasses.dataclass
class BudgetedResult:
  """The 39-budget curve: arrays of shape (39,), thresholds and the test
  samples leaving at each exit (39, K)."""
  val_acc: np.ndarray
  test_acc: np.ndarray
  test_flops: np.ndarray
  thresholds: np.ndarray
  test_exit_counts: np.ndarray

  def rows(self) -> list[dict]:
    """One dict per budget, for results.json."""
    return [{'budget_index': i + 1, 'val_top1': float(self.val_acc[i]),
             'test_top1': float(self.test_acc[i]),
             'mflops': float(self.test_flops[i]) / 1e6,
             'thresholds': [float(t) for t in self.thresholds[i]],
             'test_exit_counts': [int(c) for c in self.test_exit_counts[i]]}
            for i in range(len(self.val_acc))]


def budgeted_evaluation(val_confidence, val_predictions, val_labels,
                        test_confidence, test_predictions, test_labels,
                        flops) -> BudgetedResult:
  """Thresholds on the held-out set, applied to the test set, for 39 budgets.

  Confidences and predictions are (K, N) per-exit max probabilities and
  argmaxes; flops (K,) cumulative per exit (any unit).
  """
  val_confidence = np.asarray(val_confidence, dtype=np.float32)
  test_confidence = np.asarray(test_confidence, dtype=np.float32)
  _check_confidences(val_confidence, 'held-out confidences')
  _check_confidences(test_confidence, 'test confidences')
  num_exits = val_confidence.shape[0]
  if test_confidence.shape[0] != num_exits:
    raise ValueError('held-out and test outputs have different numbers of '
                     'exits')
  proportions = budget_proportions(num_exits)
  out = {k: [] for k in ('val_acc', 'test_acc', 'test_flops', 'thresholds',
                         'test_exit_counts')}
  for q in proportions:
    thresholds = find_thresholds(val_confidence, q)
    val_acc, _ = accuracy_and_flops(val_confidence, val_predictions,
                                    val_labels, thresholds, flops)
    test_acc, test_flops = accuracy_and_flops(
        test_confidence, test_predictions, test_labels, thresholds, flops)
    out['val_acc'].append(val_acc)
    out['test_acc'].append(test_acc)
    out['test_flops'].append(test_flops)
    out['thresholds'].append(thresholds.astype(np.float64))
    out['test_exit_counts'].append(np.bincount(
        exit_indices(test_confidence, thresholds), minlength=num_exits))
  return BudgetedResult(**{k: np.array(v) for k, v in out.items()})


def budgeted_evaluation_from_probs(val_probs, val_labels, test_probs,
                                   test_labels, flops) -> BudgetedResult:
  """The same from softmax outputs (K, N, C), validated as probabilities."""
  check_probabilities(val_probs, 'held-out probabilities')
  check_probabilities(test_probs, 'test probabilities')
  val_conf, val_pred = confidence_and_prediction(val_probs)
  test_conf, test_pred = confidence_and_prediction(test_probs)
  return budgeted_evaluation(val_conf, val_pred, val_labels, test_conf,
                             test_pred, test_labels, flops)
