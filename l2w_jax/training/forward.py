"""Forward-pass helpers every method's step uses: train-mode exit logits,
per-exit losses, weighted losses, top-1 hits and the halves of a batch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2w_jax.meta import weighting


def train_mode_logits(model: nn.Module, params, batch_stats, images,
                      compute_dtype=None):
  """Train-mode forward of a multi-exit network.

  Args:
    model: the network; `model.apply(..., train=True)` gives K exit logits.
    params, batch_stats: its variables.
    images: (B, H, W, C).
    compute_dtype: None, or e.g. 'bfloat16': the images, hence the
      activations, in that dtype.

  Returns:
    (exit_logits, new_batch_stats): K arrays (B, classes), float32 unless
    the images are float64 and `compute_dtype` is None.
  """
  if compute_dtype is not None:
    images = images.astype(compute_dtype)
  exit_logits, mutated = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True,
      mutable=['batch_stats'])
  exit_logits = [z.astype(jnp.float32) if compute_dtype is not None else z
                 for z in exit_logits]
  return exit_logits, mutated['batch_stats']


def backbone_losses(model: nn.Module, params, batch_stats, images, labels,
                    label_smoothing: float = 0.0, compute_dtype=None):
  """Train-mode forward and per-exit cross-entropy.

  Args:
    model, params, batch_stats, images, compute_dtype: as
      `train_mode_logits`.
    labels: int (B,).
    label_smoothing: the cross-entropy's smoothing.

  Returns:
    (losses (B, K), (exit_logits, new_batch_stats)).
  """
  exit_logits, batch_stats = train_mode_logits(model, params, batch_stats,
                                               images, compute_dtype)
  losses = weighting.per_exit_losses(exit_logits, labels, label_smoothing)
  return losses, (exit_logits, batch_stats)


def weighted_loss(weights: jax.Array, losses: jax.Array) -> jax.Array:
  """sum_k mean_b(w_bk * L_bk) of weights and losses (B, K): a scalar."""
  return jnp.sum(jnp.mean(weights * losses, axis=0))


def top1_hits(exit_logits, labels) -> jax.Array:
  """Correct top-1 predictions at every exit.

  Args:
    exit_logits: K arrays (B, classes).
    labels: int (B,).

  Returns:
    int32 (K,).
  """
  return jnp.stack([
      jnp.sum((jnp.argmax(z, axis=-1) == labels).astype(jnp.int32))
      for z in exit_logits])


def split_halves(images, labels):
  """`torch.chunk(2)`: ((x1, y1), (x2, y2)), the first with ceil(B/2) rows."""
  n = -(-images.shape[0] // 2)
  return (images[:n], labels[:n]), (images[n:], labels[n:])
