"""Per-sample, per-exit loss weights and the confidence-ranked meta allocation.

Everything here is a small pure function of arrays; shapes use B for samples
and K for exits.
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

CONSTRAINTS = ('row', 'col', 'mat')
NUM_BUDGETS = 39


def exit_proportions(num_exits: int, p: float) -> np.ndarray:
  """q_k = p^k / sum_j p^j for k = 1..K, as float32 (K,).

  The original computes this with float32 `exp(log(p) * k)`, whose last bit
  depends on the CPU's SIMD path (the shared fixture's values are not what
  PyTorch gives on every machine); here it is computed in float64 and rounded
  once to float32, the value closest to the formula.
  """
  if num_exits < 1:
    raise ValueError(f'num_exits must be >= 1, got {num_exits}')
  p32 = np.float64(np.float32(p))
  powers = p32 ** np.arange(1, num_exits + 1, dtype=np.float64)
  return (powers / powers.sum()).astype(np.float32)


def target_probs(num_exits: int, target_p_index: int) -> np.ndarray:
  """Exit proportions of budget `target_p_index` (1..39, p = index / 20)."""
  if not 1 <= target_p_index <= NUM_BUDGETS:
    raise ValueError(f'meta.target_p_index: must be in 1..{NUM_BUDGETS}, got '
                     f'{target_p_index}')
  return exit_proportions(num_exits, target_p_index / 20)


def exit_quotas(num_samples: int, probs: Sequence[float]) -> tuple[int, ...]:
  """How many samples exits 1..K-1 take: floor(n * q_k) in float32, as torch."""
  probs32 = np.asarray(probs, dtype=np.float32)
  return tuple(
      int(math.floor(np.float32(num_samples) * q)) for q in probs32[:-1])


def centre(raw: jax.Array, constraint: str) -> jax.Array:
  """Subtracts the mean: 'col' per sample (over exits), 'row' per exit (over
  samples), 'mat' over everything. (B, K) -> (B, K)."""
  if constraint == 'col':
    return raw - jnp.mean(raw, axis=1, keepdims=True)
  if constraint == 'row':
    return raw - jnp.mean(raw, axis=0, keepdims=True)
  if constraint == 'mat':
    return raw - jnp.mean(raw)
  raise ValueError(f'meta.constraint: unknown constraint {constraint!r}; use '
                   f'one of {CONSTRAINTS}')


def sample_weights(raw: jax.Array, constraint: str,
                   epsilon: float) -> jax.Array:
  """w = 1 + epsilon * (raw - mean): (B, K) raw weight-net outputs -> weights."""
  chex.assert_rank(raw, 2)
  return 1.0 + epsilon * centre(raw, constraint)


def per_exit_losses(exit_logits: Sequence[jax.Array], labels: jax.Array,
                    label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy of every sample at every exit: K x (B, C), (B,) -> (B, K).

  With label smoothing s, (1 - s) * NLL + s * mean_c(-log p_c), as
  `torch.nn.functional.cross_entropy(label_smoothing=s)`.
  """
  chex.assert_shape(labels, (exit_logits[0].shape[0],))
  columns = []
  for logits in exit_logits:
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    if label_smoothing:
      smooth = -jnp.mean(log_probs, axis=-1)
      nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    columns.append(nll)
  return jnp.stack(columns, axis=1)


def exit_confidences(exit_logits: Sequence[jax.Array]) -> jax.Array:
  """Max softmax probability at every exit: K x (B, C) -> (B, K)."""
  return jnp.stack(
      [jnp.max(jax.nn.softmax(z, axis=-1), axis=-1) for z in exit_logits],
      axis=1)


def weight_net_inputs(losses: jax.Array, confidences: jax.Array,
                      input_kind: str) -> jax.Array:
  """What the weight net sees: 'loss' (B, K), 'conf' (B, K) or 'both' (B, 2K)."""
  chex.assert_rank(losses, 2)
  chex.assert_equal_shape((losses, confidences))
  if input_kind == 'loss':
    return losses
  if input_kind == 'conf':
    return confidences
  if input_kind == 'both':
    return jnp.concatenate([losses, confidences], axis=1)
  raise ValueError(f"meta.input: unknown input {input_kind!r}; use 'loss', "
                   "'conf' or 'both'")


def allocate_to_exits(confidences: jax.Array,
                      quotas: Sequence[int]) -> jax.Array:
  """Assigns each sample to one exit by confidence: (B, K) -> (B,) int32.

  Exit k (k < K) takes the quotas[k] most confident samples at exit k among
  those no earlier exit took (ties: lower index first, as a stable sort);
  the last exit takes the rest. One sort per exit, no loop over samples.
  """
  chex.assert_rank(confidences, 2)
  num_samples, num_exits = confidences.shape
  if len(quotas) != num_exits - 1:
    raise ValueError(f'need {num_exits - 1} quotas for {num_exits} exits, got '
                     f'{len(quotas)}')
  assignment = jnp.full((num_samples,), num_exits - 1, dtype=jnp.int32)
  taken = jnp.zeros((num_samples,), dtype=bool)
  index = jnp.arange(num_samples)
  for k, quota in enumerate(quotas):
    if quota <= 0:
      continue
    # Untaken samples first, by descending confidence, then by index.
    order = jnp.lexsort((index, -confidences[:, k], taken))
    rank = jnp.zeros((num_samples,), jnp.int32).at[order].set(
        jnp.arange(num_samples, dtype=jnp.int32))
    chosen = jnp.logical_and(~taken, rank < quota)
    assignment = jnp.where(chosen, k, assignment)
    taken = jnp.logical_or(taken, chosen)
  return assignment


def assign_by_confidence(exit_logits: Sequence[jax.Array],
                         probs: Sequence[float]) -> jax.Array:
  """L2W-DEN's allocation of a batch: K x (B, C) logits -> (B,) int32 exit
  of each sample (`allocate_to_exits` on the exits' confidences, as
  constants, within the quotas of `probs` (K,))."""
  confidences = jax.lax.stop_gradient(exit_confidences(exit_logits))
  return allocate_to_exits(confidences,
                           exit_quotas(confidences.shape[0], probs))


def allocated_loss(losses: jax.Array, assignment: jax.Array) -> jax.Array:
  """Sum over exits of the mean loss of the samples assigned there.

  losses (B, K), assignment (B,) -> scalar; an exit with no samples adds 0.
  """
  chex.assert_rank(losses, 2)
  chex.assert_shape(assignment, (losses.shape[0],))
  num_exits = losses.shape[1]
  member = jax.nn.one_hot(assignment, num_exits, dtype=losses.dtype)
  counts = jnp.sum(member, axis=0)
  sums = jnp.sum(member * losses, axis=0)
  means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), 0.0)
  return jnp.sum(means)


def allocation_weights(exit_logits: Sequence[jax.Array],
                       probs: Sequence[float]) -> jax.Array:
  """Training-data allocation as weights (`meta.ablation='allocation'`).

  Each sample goes to one exit by confidence within the exits' quotas
  (`allocate_to_exits`, the meta objective's rule, here on the training
  samples); its weight is B / n_k at its exit k (n_k the samples there) and
  0 elsewhere, so that sum_k mean_b(w_bk L_bk) = `allocated_loss`: each exit
  trained on the mean loss of its own samples.

  Args:
    exit_logits: K x (B, C).
    probs: (K,) the exits' shares of the samples.

  Returns:
    (B, K) weights, in the logits' dtype.
  """
  num_samples, num_exits = exit_logits[0].shape[0], len(exit_logits)
  member = jax.nn.one_hot(assign_by_confidence(exit_logits, probs),
                          num_exits, dtype=exit_logits[0].dtype)
  counts = jnp.sum(member, axis=0)
  return member * (num_samples / jnp.maximum(counts, 1.0))
