"""BoostNet (Yu et al., "Boosted Dynamic Neural Networks", AAAI 2023).

Each exit is a weak learner on top of the ensemble of the exits before it.
With per-exit reweights r (the original's `--ensemble_reweight`, 0.5 in
every released script), following `DynamicNet` of the original:

  training  P_0 = 0,  P_k = (o_k + P_{k-1}) * r_k,
            loss = sum_k CE(o_k + stop_gradient(P_{k-1}), y)
  test      Q_0 = o_0 (= o_0 + 0 * r_0),  Q_k = o_k + Q_{k-1} * r_k

(0-based k; sums in exit order; CE is the batch mean). The test-time rule
lives with the model (`models.ensemble`), whose eval-mode outputs it is. With one r for all
exits both give o_k + r o_{k-1} + r^2 o_{k-2} + ...; with varying r the
original indexes r by the exit that produced the partial sum in training and
by the exit that consumes it at test time, reproduced here.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from l2w_jax.meta import weighting
from l2w_jax.models import backbone_config
from l2w_jax.models.ensemble import ensemble_logits
from l2w_jax.optim import apply_optimizer
from l2w_jax.training import registry
from l2w_jax.training.forward import top1_hits, train_mode_logits
from l2w_jax.training.state import Learner, TrainState, compute_dtype


def reweights(value, num_exits: int) -> tuple[float, ...]:
  """The original's `--ensemble_reweight` rule: one value repeated, two values
  as `linspace(a, b, K)`, or K values as given."""
  values = tuple(float(v) for v in (value if isinstance(value, (tuple, list))
                                    else (value,)))
  if len(values) == 1:
    return values * num_exits
  if len(values) == 2:
    a, b = values
    if num_exits == 1:
      return (a,)
    return tuple(a + (b - a) * i / (num_exits - 1) for i in range(num_exits))
  if len(values) == num_exits:
    return values
  raise ValueError(f'boostnet.reweight: give 1, 2 or {num_exits} (number of '
                   f'exits) values, got {len(values)}')


def training_inputs(exit_logits: Sequence[jax.Array],
                    reweight: Sequence[float]) -> list[jax.Array]:
  """The logits each exit's cross-entropy sees in training:
  o_k + stop_gradient(P_{k-1}), each (B, C)."""
  inputs = []
  previous = None
  for logits, r in zip(exit_logits, reweight):
    summed = logits if previous is None else logits + previous
    inputs.append(summed)
    previous = jax.lax.stop_gradient(summed * r)
  return inputs


def stage_losses(exit_logits: Sequence[jax.Array], labels: jax.Array,
                 reweight: Sequence[float],
                 label_smoothing: float = 0.0) -> jax.Array:
  """(K,) batch-mean cross-entropy of each exit's boosted training input."""
  per_sample = weighting.per_exit_losses(
      training_inputs(exit_logits, reweight), labels, label_smoothing)
  return jnp.mean(per_sample, axis=0)


LOSS_AVERAGE_MOMENTUM = 0.9  # the original's MomentumMeter(momentum=0.9)


def initial_loss_averages(num_exits: int, dtype=jnp.float32) -> dict:
  """Loss equalisation's state: the moving average of each stage's loss
  (`dtype`, the parameters') and the number of updates so far (the first
  update sets the average)."""
  return {'loss_average': jnp.zeros((num_exits,), dtype),
          'updates': jnp.zeros((), jnp.int32)}


def update_loss_averages(averages: dict, losses: jax.Array) -> dict:
  """`MomentumMeter.update` for each stage: the loss itself the first time,
  then m <- 0.9 m + 0.1 loss."""
  losses = losses.astype(averages['loss_average'].dtype)
  moved = (averages['loss_average'] * LOSS_AVERAGE_MOMENTUM +
           losses * (1 - LOSS_AVERAGE_MOMENTUM))
  return {'loss_average': jnp.where(averages['updates'] > 0, moved, losses),
          'updates': averages['updates'] + 1}


def equalised_loss(losses: jax.Array, averages: jax.Array) -> jax.Array:
  """sum_k L_k / m_k * mean_j m_j with the averages m as constants (the
  original's `--loss_equal`); the averages already include this step."""
  weight_mean = jnp.mean(averages)
  return jnp.sum(losses / averages * weight_mean)


def boostnet_step(learner: Learner, state: TrainState, images, labels,
                  learning_rate):
  """One SGD step on a whole (per-device) batch with the summed stage losses;
  the reweights are the model's `ensemble_reweight`.

  Returns (new_state, metrics) as the methods registry documents; `correct`
  counts the hits of the boosted predictions Q_k.
  """
  reweight = learner.model.cfg.ensemble_reweight
  settings = learner.settings
  equalise = dict(learner.method_options).get('loss_equal', False)

  def loss_fn(params):
    exit_logits, batch_stats = train_mode_logits(
        learner.model, params, state.batch_stats, images,
        compute_dtype(settings))
    losses = stage_losses(exit_logits, labels, reweight,
                          settings.label_smoothing)
    if not equalise:
      return jnp.sum(losses), (losses, exit_logits, batch_stats, None)
    # The averages follow the devices' mean losses (one set for all
    # devices; the original keeps one per rank, on its own losses), as
    # constants.
    averages = update_loss_averages(
        state.method_state,
        learner.reduce_grads(jax.lax.stop_gradient(losses)))
    loss = equalised_loss(losses, averages['loss_average'])
    return loss, (losses, exit_logits, batch_stats, averages)

  (train_loss, (losses, exit_logits, batch_stats, averages)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  params, opt_state = apply_optimizer(learner.tx, learner.reduce_grads(grads),
                                      state.opt_state, state.params,
                                      learning_rate)
  predictions = [jax.lax.stop_gradient(q)
                 for q in ensemble_logits(exit_logits, reweight)]
  new_state = state.replace(
      params=params, batch_stats=learner.reduce_batch_stats(batch_stats),
      opt_state=opt_state,
      method_state=averages if equalise else state.method_state)
  weights = (jnp.ones_like(losses) if not equalise else
             jnp.mean(averages['loss_average']) / averages['loss_average'])
  return new_state, {'train_loss': train_loss, 'loss_per_exit': losses,
                     'weight_per_exit': weights.astype(losses.dtype),
                     'correct': top1_hits(predictions, labels)}


def _backbone(config) -> dict:
  r = config.boostnet.reweight
  reweight = reweights(r, backbone_config(config).num_exits)
  if any(not 0.0 <= v <= 1.0 for v in reweight):
    raise ValueError(f'boostnet.reweight: each r must be in [0, 1], got {r}')
  return {'gradient_equilibrium': True, 'ensemble_reweight': reweight}


def _options(config, num_exits) -> dict:
  del num_exits
  return {'loss_equal': bool(config.boostnet.get('loss_equal', False))}


def _initial_state(learner, dtype):
  if not learner.option('loss_equal'):
    return None
  return initial_loss_averages(learner.model.num_exits, dtype)


registry.register('boostnet', batch_step=boostnet_step, backbone=_backbone,
                  options=_options, initial_state=_initial_state)
