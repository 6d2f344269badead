r"""Shallow-Deep Networks' training (Kaya et al., ICML 2019), registered from
outside the package as `config.method = 'examples.shallow_deep:sdn'`:

  python -m experiments.main --config=configs/digits.py \
      --config.method=examples.shallow_deep:sdn --workdir=/tmp/sdn

The SDN objective trains every internal classifier (exit k < K) with a
weight tau_k that grows over the epochs and the last exit with weight 1:

  loss = sum_{k<K} tau_k(e) CE_k + CE_K,   tau_k(e) = min(C_k, 0.01 + e C_k / E)

in epoch e = 1..E of E, with one SGD step per whole batch (CE_k: the batch
mean of exit k's cross-entropy). These are the rules of the original's
`sdn_train` / `sdn_training_step` (yigitcankaya/Shallow-Deep-Networks,
model_funcs.py), whose six internal classifiers have C = 0.15, 0.30, ...,
0.90, i.e. C_k = 0.9 k / 6; for a network with K - 1 internal classifiers
this module uses C_k = 0.9 k / (K - 1) (k = 1..K-1), the same values at
K = 7. A run of `train.num_steps` iterations counts its epochs as
ceil(num_steps / iterations per epoch).

Everything else (the loop, sharding, checkpoints, budgeted evaluation, the
cascade, export) is the project's: this file is the whole method.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from l2w_jax import data
from l2w_jax.optim import apply_optimizer
from l2w_jax.training import registry
from l2w_jax.training.forward import backbone_losses, top1_hits
from l2w_jax.training.state import Learner, TrainState, compute_dtype

NAME = 'sdn'
LARGEST_COEFFICIENT = 0.9  # C of the deepest internal classifier
START = 0.01  # tau_k at epoch 0


def largest_coefficients(num_exits: int) -> tuple[float, ...]:
  """C_k for the K - 1 internal classifiers, then 1.0 for the last exit."""
  inner = num_exits - 1
  return tuple(LARGEST_COEFFICIENT * k / inner
               for k in range(1, inner + 1)) + (1.0,)


def coefficients(step: jax.Array, largest, steps_per_epoch: int,
                 epochs: int) -> jax.Array:
  """The loss weights of iteration `step` (0-based).

  Args:
    step: int scalar, iterations done before this one.
    largest: K floats, `largest_coefficients`.
    steps_per_epoch, epochs: the run's epoch length and count.

  Returns:
    float32 (K,): min(C_k, 0.01 + e C_k / E) for the internal classifiers
    in epoch e = step // steps_per_epoch + 1, and 1 for the last exit.
  """
  c = jnp.asarray(largest, jnp.float32)
  epoch = (step // steps_per_epoch + 1).astype(jnp.float32)
  tau = jnp.minimum(c, START + epoch * c / epochs)
  return tau.at[-1].set(1.0)


def sdn_step(learner: Learner, state: TrainState, images, labels,
             learning_rate):
  """One SGD step on a (per-device) batch with the SDN objective.

  Args:
    learner, state: as every step's; options `largest`, `steps_per_epoch`,
      `epochs`.
    images: (B, H, W, C); labels: int (B,).
    learning_rate: scalar.

  Returns:
    (new_state, metrics) as `training.registry` documents; `weight_per_exit`
    holds tau.
  """
  s = learner.settings
  tau = coefficients(state.step, learner.option('largest'),
                     learner.option('steps_per_epoch'),
                     learner.option('epochs'))

  def loss_fn(params):
    losses, (exit_logits, batch_stats) = backbone_losses(
        learner.model, params, state.batch_stats, images, labels,
        s.label_smoothing, compute_dtype(s))
    per_exit = jnp.mean(losses, axis=0)
    return jnp.sum(tau.astype(per_exit.dtype) * per_exit), (
        per_exit, exit_logits, batch_stats)

  (loss, (per_exit, exit_logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  params, opt_state = apply_optimizer(learner.tx, learner.reduce_grads(grads),
                                      state.opt_state, state.params,
                                      learning_rate)
  new_state = state.replace(
      params=params, batch_stats=learner.reduce_batch_stats(batch_stats),
      opt_state=opt_state)
  return new_state, {'train_loss': loss, 'loss_per_exit': per_exit,
                     'weight_per_exit': tau.astype(per_exit.dtype),
                     'correct': top1_hits([jax.lax.stop_gradient(z)
                                           for z in exit_logits], labels)}


def options(config, num_exits: int) -> dict:
  """The schedule of tau from the run's length (ValueError if too short)."""
  steps_per_epoch = data.steps_per_epoch(data.data_info(config),
                                         config.train.batch_size,
                                         config.train.last_batch)
  if steps_per_epoch < 1:
    raise ValueError(f'train.batch_size {config.train.batch_size} exceeds '
                     'the training set: SDN needs at least one iteration per '
                     'epoch')
  epochs = (math.ceil(config.train.num_steps / steps_per_epoch)
            if config.train.num_steps > 0 else int(config.train.epochs))
  return {'largest': largest_coefficients(num_exits),
          'steps_per_epoch': steps_per_epoch, 'epochs': max(epochs, 1)}


registry.register(NAME, batch_step=sdn_step, options=options)
