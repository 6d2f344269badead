"""Uniform weighting, the plain multi-exit baseline of L2W-DEN
(`config.method = 'uniform'`): every exit's loss with weight 1, trained in
the same halves as L2W-DEN so that the two see the same updates but for
the weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2w_jax.optim import apply_optimizer
from l2w_jax.training import registry
from l2w_jax.training.forward import backbone_losses, top1_hits, weighted_loss
from l2w_jax.training.state import Learner, TrainState, compute_dtype


def uniform_half_step(learner: Learner, state: TrainState, images, labels,
                      learning_rate):
  """The plain multi-exit update (all weights 1) on one half of a batch.

  Args:
    learner, state: as every step's.
    images: (B, H, W, C); labels: int (B,).
    learning_rate: scalar.

  Returns:
    (new_state, metrics) with `losses` (B, K), `train_loss`,
    `loss_per_exit` and `weight_per_exit` (K,), `correct` (K,).
  """
  s = learner.settings

  def loss_fn(params):
    losses, aux = backbone_losses(learner.model, params, state.batch_stats,
                                  images, labels, s.label_smoothing,
                                  compute_dtype(s))
    return weighted_loss(jnp.ones_like(losses), losses), (losses, aux)

  (train_loss, (losses, (exit_logits, new_batch_stats))), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  params, opt_state = apply_optimizer(learner.tx, learner.reduce_grads(grads),
                                      state.opt_state, state.params,
                                      learning_rate)
  new_state = state.replace(
      params=params, batch_stats=learner.reduce_batch_stats(new_batch_stats),
      opt_state=opt_state)
  return new_state, {'losses': losses, 'train_loss': train_loss,
                     'loss_per_exit': jnp.mean(losses, axis=0),
                     'weight_per_exit': jnp.ones(losses.shape[1:]),
                     'correct': top1_hits(exit_logits, labels)}


def _half_step(learner, state, train_images, train_labels, meta_images,
               meta_labels, learning_rate, meta_learning_rate, with_meta):
  del meta_images, meta_labels, meta_learning_rate, with_meta
  return uniform_half_step(learner, state, train_images, train_labels,
                           learning_rate)


registry.register('uniform', _half_step)
