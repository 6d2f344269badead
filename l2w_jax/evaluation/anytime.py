"""Anytime evaluation: every exit's outputs on a whole split.

`exit_statistics` is the per-batch function to jit; `collect` runs it over
padded batches and keeps, per exit and sample, what both evaluations need:
the confidence (max softmax) and prediction for the budgeted curve, top-1 /
top-5 hits and the loss for the anytime accuracies.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax.meta import weighting


def exit_statistics(model: nn.Module, variables, images, labels):
  """Eval-mode forward of a batch -> dict of (K, B) arrays.

  `confidence` max softmax, `prediction` argmax, `top1` / `top5` hits (bool),
  `loss` cross-entropy.
  """
  exit_logits = model.apply(variables, images, train=False)
  logits = jnp.stack(exit_logits)  # (K, B, C)
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hits = top == labels[None, :, None]
  return {
      'confidence': jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1),
      'prediction': jnp.argmax(logits, axis=-1).astype(jnp.int32),
      'top1': hits[..., 0],
      'top5': jnp.any(hits, axis=-1),
      'loss': weighting.per_exit_losses(exit_logits, labels).T,
  }


@dataclasses.dataclass
class ExitOutputs:
  """Per-exit outputs on a split: (K, N) arrays and labels (N,)."""
  confidence: np.ndarray
  prediction: np.ndarray
  top1: np.ndarray
  top5: np.ndarray
  loss: np.ndarray
  labels: np.ndarray

  @property
  def num_samples(self) -> int:
    return int(self.labels.shape[0])

  def top1_accuracy(self) -> np.ndarray:
    """(K,) percent."""
    return 100.0 * self.top1.mean(axis=1)

  def top5_accuracy(self) -> np.ndarray:
    return 100.0 * self.top5.mean(axis=1)

  def mean_loss(self) -> np.ndarray:
    return self.loss.mean(axis=1)


def collect(statistics_fn: Callable, batches: Iterable[dict]) -> ExitOutputs:
  """Runs `statistics_fn(images, labels)` over batches with a 'mask' and
  keeps the unmasked samples, in order."""
  parts = {key: [] for key in ('confidence', 'prediction', 'top1', 'top5',
                               'loss')}
  labels = []
  for batch in batches:
    out = statistics_fn(batch['image'], batch['label'])
    keep = np.asarray(batch.get('mask', np.ones(len(batch['label']), bool)))
    for key in parts:
      parts[key].append(np.asarray(out[key])[:, keep])
    labels.append(np.asarray(batch['label'])[keep])
  if not labels:
    raise ValueError('the evaluation split yielded no batches')
  return ExitOutputs(labels=np.concatenate(labels),
                     **{k: np.concatenate(v, axis=1) for k, v in parts.items()})
