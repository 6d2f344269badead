"""Measured cost of real early exiting against the FLOPs prediction.

For each budget: thresholds from the threshold split, then on the test set
(a) the cascade in batches, (b) one image at a time with the exits decided on device (`lax.cond`), each timed
per image and compared with the full network (every block and every exit,
which is what the original computes), next to the speed-up the FLOPs count
predicts (full-network FLOPs / expected FLOPs).
"""

from __future__ import annotations


import jax
import numpy as np

from l2w_jax import data
from l2w_jax.evaluation import budgeted, report
from l2w_jax.evaluation.cascade import (Cascade, SingleImageCascade,
                                        simulated_exits)
from l2w_jax.evaluation.cascade_timing import compare_with_full_network
from l2w_jax.evaluation.flops import count_per_exit


def _test_images(config, batch_size: int) -> tuple[list[np.ndarray],
                                                   np.ndarray]:
  """The test set as full batches of `batch_size` (the last one trimmed)."""
  images, labels = [], []
  for batch in data.eval_batches(config, 'test', batch_size):
    keep = batch['mask']
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
  return images, np.concatenate(labels)


def measure(config, model, variables, info, budgets, batch_size: int,
            latency_images: int) -> list[dict]:
  """One dict of measurements per budget index."""
  statistics = report.jitted_statistics(model)
  held_out = report.threshold_outputs(config, statistics, variables)
  test = statistics.outputs(config, variables, 'test')
  flops = np.asarray(count_per_exit(model, info.image_shape)[0])
  batches, labels = _test_images(config, batch_size)
  singles = [img[None] for b in batches for img in b][:latency_images]

  full = jax.jit(lambda x: model.apply(variables, x, train=False))
  for b in batches[:1] + singles[:1]:
    jax.block_until_ready(full(b))  # compile both shapes

  in_batches = Cascade(model, variables, np.zeros(model.num_exits),
                       max_batch=batch_size)
  one_by_one = SingleImageCascade(model, variables,
                                  np.zeros(model.num_exits))
  in_batches.warm_up(info.image_shape)
  jax.block_until_ready(one_by_one(singles[0]))

  rows = []
  proportions = budgeted.budget_proportions(model.num_exits)
  for index in budgets:
    if not 1 <= index <= budgeted.NUM_BUDGETS:
      raise ValueError(f'budget index {index} is not in '
                       f'1..{budgeted.NUM_BUDGETS}')
    thresholds = budgeted.find_thresholds(held_out.confidence,
                                          proportions[index - 1])
    in_batches.thresholds = one_by_one.thresholds = thresholds
    outputs = [in_batches(b) for b in batches]
    predictions = np.concatenate([o.predictions for o in outputs])
    exits = np.concatenate([o.exits for o in outputs])
    want_pred, want_exits = simulated_exits(test.confidence, test.prediction,
                                            thresholds)
    accuracy, expected_flops = budgeted.accuracy_and_flops(
        test.confidence, test.prediction, test.labels, thresholds, flops)
    t = compare_with_full_network(full, in_batches, one_by_one, batches,
                                  singles)
    single = [one_by_one(x) for x in singles]
    single_agree = np.mean([int(p) == want_pred[i] and int(e) == want_exits[i]
                            for i, (p, e) in enumerate(single)])
    rows.append({
        'budget_index': index,
        'test_top1': accuracy,
        'cascade_top1': 100.0 * float(np.mean(predictions == labels)),
        'same_predictions': float(np.mean(predictions == want_pred)),
        'same_exits': float(np.mean(exits == want_exits)),
        'single_same_as_simulated': float(single_agree),
        'exit_fractions': (np.bincount(exits, minlength=model.num_exits) /
                           len(exits)).tolist(),
        'expected_mflops': expected_flops / 1e6,
        'flops_speedup': float(flops[-1] / expected_flops),
        'batch_ms_per_image': 1e3 * t['cascade_batch_s'],
        'batch_speedup': t['batch_speedup'],
        'single_ms_per_image': 1e3 * t['cascade_single_s'],
        'single_speedup': t['single_speedup'],
        'full_batch_ms_per_image': 1e3 * t['full_batch_s'],
        'full_single_ms_per_image': 1e3 * t['full_single_s'],
        'batch_size': batch_size,
        'latency_images': len(singles),
    })
  return rows


def format_table(rows: list[dict]) -> str:
  """A plain-text table of the measurements."""
  header = (f'{"budget":>6} {"top1":>6} {"MFLOPs":>7} {"FLOPs x":>7} '
            f'{"batch ms":>8} {"batch x":>7} {"1-img ms":>8} {"1-img x":>7} '
            f'{"agree":>6}')
  lines = [header]
  for r in rows:
    lines.append(
        f'{r["budget_index"]:>6} {r["test_top1"]:>6.2f} '
        f'{r["expected_mflops"]:>7.2f} {r["flops_speedup"]:>7.2f} '
        f'{r["batch_ms_per_image"]:>8.3f} {r["batch_speedup"]:>7.2f} '
        f'{r["single_ms_per_image"]:>8.3f} {r["single_speedup"]:>7.2f} '
        f'{100 * r["same_predictions"]:>5.1f}%')
  if rows:
    batch = np.median([r['full_batch_ms_per_image'] for r in rows])
    single = np.median([r['full_single_ms_per_image'] for r in rows])
    lines.append(f'full network (all blocks and exits): {batch:.3f} ms per '
                 f'image in batches of {rows[0]["batch_size"]}, {single:.3f} '
                 'ms one at a time (medians; each row is timed against its '
                 'own interleaved full-network run)')
  return '\n'.join(lines)
