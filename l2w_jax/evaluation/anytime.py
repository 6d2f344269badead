"""Anytime evaluation: every exit's outputs on a whole split.

`exit_statistics` is the per-batch function to jit; `collect` runs it over
padded batches (a few in flight) and keeps, per exit and sample, what both
evaluations need: the confidence (max softmax) and prediction for the
budgeted curve, top-1 / top-5 hits and the loss for the anytime accuracies.
"""

from __future__ import annotations

import collections
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


def collect(statistics_fn: Callable, batches: Iterable[dict],
            in_flight: int = 2) -> ExitOutputs:
  """Runs `statistics_fn` over batches and keeps the unmasked samples, in
  order.

  Args:
    statistics_fn: f(batch) -> dict of (K, B) arrays (`exit_statistics`'
      keys); it may also return the batch's 'label' and 'mask' (B,), e.g.
      the global ones when each process passes only its rows.
    batches: dicts with 'image', 'label' (B,) and optionally 'mask' (B,),
      False on padding rows.
    in_flight: batches dispatched before the oldest one is read back, so
      the devices work while the host fetches and prepares.

  Returns:
    ExitOutputs over the real samples.
  """
  keys = ('confidence', 'prediction', 'top1', 'top5', 'loss')
  parts = {key: [] for key in keys}
  labels = []
  pending = collections.deque()

  def read_oldest():
    batch, out = pending.popleft()
    out = jax.device_get(out)
    label = np.asarray(out.get('label', batch['label']))
    keep = np.asarray(out.get('mask', batch.get('mask',
                                                np.ones(len(label), bool))))
    for key in keys:
      parts[key].append(np.asarray(out[key])[:, keep])
    labels.append(label[keep])

  for batch in batches:
    pending.append((batch, statistics_fn(batch)))
    if len(pending) > in_flight:
      read_oldest()
  while pending:
    read_oldest()
  if not labels:
    raise ValueError('the evaluation split yielded no batches')
  return ExitOutputs(labels=np.concatenate(labels),
                     **{k: np.concatenate(v, axis=1) for k, v in parts.items()})
