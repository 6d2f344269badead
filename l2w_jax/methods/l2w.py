"""L2W-DEN (Han et al., ECCV 2022): `config.method = 'l2w'`.

A training iteration splits its batch into halves p1, p2 and calls
`l2w_half_step` twice: (train p1, meta p2), then (train p2, meta p1). Each call

1. runs the backbone once on the train half (train mode) and keeps the VJP;
2. on meta iterations, takes a *virtual* SGD step with weights from the weight
   net (same optax optimizer, learning rate, momentum buffer and decay as the
   real step; the new optimizer state and the BN statistics are discarded),
   runs the virtually updated backbone on the meta half (train mode),
   allocates those samples to exits by confidence, and updates the weight net
   with Adam on the gradient of the meta loss taken *through* the virtual
   step (`jax.value_and_grad` over a function that itself calls the VJP);
3. weights the train-half losses with the updated weight net (as constants)
   and takes the real SGD step.

The forward pass of steps 2 and 3 is the same computation (same parameters,
inputs and batch statistics), so it runs once and serves both VJPs.

The method's hyper-parameters (`config.meta`) are one option, `'l2w'`, an
`L2WSettings`. Nothing here is jitted: callers jit `l2w_half_step` (with
`with_meta` static).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax.meta import api, pieces, weighting
from l2w_jax.optim import apply_optimizer, torch_adam
from l2w_jax.training import registry
from l2w_jax.training.forward import (backbone_losses, split_halves,
                                      top1_hits, weighted_loss)
from l2w_jax.training.state import (Learner, Settings, TrainState,
                                    compute_dtype)

OPTION = 'l2w'  # the method option that holds the `L2WSettings`

# config.meta.ablation: the paper's ablation studies (docs/methods.md,
# "Ablations"). None is a flag of the original code; each is a
# reconstruction from its code and the ablation's name.
ABLATIONS = ('none', 'allocation', 'fixed_weights', 'frozen',
             'vanilla_objective')
# The ablations whose weights are not learned: no meta step runs.
_NOT_LEARNED = ('allocation', 'fixed_weights', 'frozen')


@dataclasses.dataclass(frozen=True)
class L2WSettings:
  """L2W-DEN's hyper-parameters the half step needs at trace time."""
  epsilon: float = 0.8
  constraint: str = 'col'
  input_kind: str = 'loss'
  target_probs: tuple[float, ...] = ()
  # How the virtual step is taken (`api.MetaOptions`).
  meta_options: api.MetaOptions = api.MetaOptions()
  # The meta step's pieces by name (`meta.pieces`; config fields of the
  # same names).
  weight_net: str = 'mlp'
  objective: str = 'allocation'
  inner_update: str = 'optimizer'
  # config.meta.ablation (`ABLATIONS`) and, for 'fixed_weights', the
  # exits' constant weights (K,).
  ablation: str = 'none'
  fixed_weights: tuple[float, ...] = ()

  @property
  def learns_weights(self) -> bool:
    """Whether the weight net is meta-learned (a meta step runs)."""
    return self.ablation not in _NOT_LEARNED


def l2w_learner(model, weight_net, tx, meta_tx,
                l2w: L2WSettings = L2WSettings(),
                settings: Settings = Settings(), **kwargs) -> Learner:
  """A `Learner` for L2W-DEN's steps with `l2w` as its settings (the
  other fields as `Learner`'s; for use without a config)."""
  return Learner(model=model, tx=tx, settings=settings,
                 weight_net=weight_net, meta_tx=meta_tx,
                 method_options=((OPTION, l2w),), **kwargs)


def _target_probs(meta, num_exits: int) -> tuple[float, ...]:
  """`meta.target_probs` as float32 values, or those of
  `meta.target_p_index`; ValueError naming the field."""
  given = tuple(meta.get('target_probs', ()) or ())
  if not given:
    return tuple(float(q) for q in weighting.target_probs(
        num_exits, meta.target_p_index))
  probs = np.asarray(given, np.float64)
  if (probs.shape != (num_exits,) or not np.all(np.isfinite(probs)) or
      np.any(probs < 0) or abs(probs.sum() - 1.0) > 1e-6):
    raise ValueError(f'meta.target_probs: {num_exits} shares >= 0 that sum '
                     f'to 1 (or () for meta.target_p_index), got {given}')
  return tuple(float(q) for q in probs.astype(np.float32))


def settings_from_config(config, num_exits: int) -> L2WSettings:
  """`config.meta` as `L2WSettings`; ValueError naming a bad field."""
  meta = config.meta
  weighting.centre(jnp.zeros((1, 1)), meta.constraint)  # validates the name
  if meta.interval < 1:
    raise ValueError(f'meta.interval: must be >= 1, got {meta.interval}')
  names = {'weight_net': meta.get('weight_net', 'mlp'),
           'objective': meta.get('objective', 'allocation'),
           'inner_update': meta.get('inner_update', 'optimizer')}
  pieces.weight_net(names['weight_net'])  # each raises naming its field
  pieces.objective(names['objective'])
  pieces.inner_update(names['inner_update'])
  ablation = meta.get('ablation', 'none') or 'none'
  if ablation not in ABLATIONS:
    raise ValueError(f'meta.ablation: unknown {ablation!r}; available: '
                     f'{ABLATIONS}')
  if ablation != 'none' and (names['weight_net'], names['objective']) != (
      'mlp', 'allocation'):
    raise ValueError(f'meta.ablation={ablation!r} ablates L2W-DEN\'s own '
                     'pieces: leave meta.weight_net=mlp and '
                     'meta.objective=allocation')
  if ablation == 'vanilla_objective':
    names['objective'] = 'vanilla'
  target = _target_probs(meta, num_exits)
  return L2WSettings(
      epsilon=float(meta.epsilon),
      constraint=meta.constraint,
      input_kind=meta.input,
      target_probs=target,
      meta_options=api.MetaOptions(
          inner_steps=meta.get('inner_steps', 1),
          first_order=bool(meta.get('first_order', False)),
          virtual_params=meta.get('virtual_params', 'all')),
      ablation=ablation,
      fixed_weights=(_fixed_weights(meta, target)
                     if ablation == 'fixed_weights' else ()),
      **names)


def _fixed_weights(meta, target_probs) -> tuple[float, ...]:
  """`meta.fixed_weights`, or by default K * target_probs: each exit
  weighted by the share of samples the allocation gives it (mean 1 over
  the exits); ValueError naming the field."""
  given = tuple(meta.get('fixed_weights', ()) or ())
  num_exits = len(target_probs)
  if not given:
    return tuple(float(num_exits * q) for q in target_probs)
  weights = np.asarray(given, np.float64)
  if (weights.shape != (num_exits,) or not np.all(np.isfinite(weights)) or
      np.any(weights < 0)):
    raise ValueError(f'meta.fixed_weights: {num_exits} weights >= 0 (or () '
                     f'for K * the target shares), got {given}')
  return tuple(float(w) for w in weights)


def options_from_config(config, num_exits: int) -> dict:
  """The method options of L2W-DEN: {'l2w': L2WSettings}."""
  return {OPTION: settings_from_config(config, num_exits)}


def weight_net_from_config(config, num_exits: int):
  """(the weight net `meta.weight_net` names, its Adam) from `config.meta`."""
  meta = config.meta
  piece = pieces.weight_net(meta.get('weight_net', 'mlp'))
  return (piece.build(meta, num_exits),
          torch_adam(meta.lr, meta.weight_decay))


def init_weight_net(learner: Learner, rng: jax.Array, dtype):
  """The weight net's initial parameters (its piece's `init`)."""
  piece = pieces.weight_net(learner.option(OPTION).weight_net)
  return piece.init(learner.weight_net, rng, learner.model.num_exits, dtype)


def weight_fn(learner: Learner):
  """weight_fn(meta_params, losses (B, K), exit_logits) -> weights (B, K)
  of the configured weight net (`meta.pieces`), or of the ablation that
  replaces it: 'allocation' the confidence allocation's
  (`weighting.allocation_weights`), 'fixed_weights' the exits' constants."""
  s = learner.option(OPTION)
  if s.ablation == 'allocation':
    return lambda meta_params, losses, exit_logits: (
        weighting.allocation_weights(exit_logits, s.target_probs).astype(
            losses.dtype))
  if s.ablation == 'fixed_weights':
    return lambda meta_params, losses, exit_logits: jnp.broadcast_to(
        jnp.asarray(s.fixed_weights, losses.dtype), losses.shape)
  return pieces.weight_net(s.weight_net).weight_fn(learner.weight_net, s)


def predict_weights(learner: Learner, meta_params, inputs) -> jax.Array:
  """L2W-DEN's MLP ('mlp'): its inputs (B, K or 2K) -> weights (B, K)."""
  raw = learner.weight_net.apply({'params': meta_params}, inputs)
  s = learner.option(OPTION)
  return weighting.sample_weights(raw, s.constraint, s.epsilon)


def meta_pieces(learner: Learner, state: TrainState) -> dict:
  """The keyword arguments of `api.meta_loss` / `api.meta_gradient` that
  make L2W-DEN's meta step for `learner` at `state`: the backbone in train
  mode on the batch statistics (the training half label-smoothed as
  configured, the meta half never), and the configured weight net, meta
  objective and inner update (`meta.pieces`: by default L2W-DEN's MLP, the
  confidence allocation and the real optimizer) and `MetaOptions`."""
  s = learner.option(OPTION)
  dtype = compute_dtype(learner.settings)
  smoothing = learner.settings.label_smoothing
  return dict(
      params=state.params, opt_state=state.opt_state,
      losses_fn=api.backbone_loss_fn(learner.model, state.batch_stats,
                                     smoothing, dtype),
      meta_losses_fn=api.backbone_loss_fn(learner.model, state.batch_stats,
                                          0.0, dtype),
      weight_fn=weight_fn(learner),
      objective_fn=pieces.objective(s.objective)(s),
      inner_update=pieces.inner_update(s.inner_update)(learner.tx),
      options=s.meta_options)


def train_forward(learner: Learner, state: TrainState, images, labels):
  """The train half's forward pass, kept for two VJPs.

  Returns (losses (B, K), loss_vjp, exit_logits, new_batch_stats,
  weight_inputs): `loss_vjp(cotangent (B, K))` gives the gradient of
  sum(cotangent * losses) w.r.t. the backbone parameters, and weight_inputs
  = (losses, exit_logits) as constants, what the weight function reads.
  """
  s = learner.settings
  losses, loss_vjp, (exit_logits, new_batch_stats) = jax.vjp(
      lambda p: backbone_losses(learner.model, p, state.batch_stats, images,
                                labels, s.label_smoothing,
                                compute_dtype(s)),
      state.params, has_aux=True)
  weight_inputs = jax.lax.stop_gradient((losses, exit_logits))
  return losses, loss_vjp, exit_logits, new_batch_stats, weight_inputs


def meta_gradient(learner: Learner, state: TrainState, first_forward,
                  train_batch, meta_batch, learning_rate):
  """This device's meta-gradient: ((meta_loss, (pseudo_weights,
  exit_assignment)), gradient w.r.t. state.meta_params), through the virtual
  step (`api.meta_gradient` with `meta_pieces`). `first_forward` is
  (losses, loss_vjp, exit_logits) of `train_forward` on `train_batch`
  (images, labels). Under data parallelism the virtual step's gradient
  stays per device (the original's virtual step differentiates a local copy
  of the network, which DDP does not all-reduce)."""
  return api.meta_gradient(state.meta_params, **meta_pieces(learner, state),
                           train_batch=train_batch, meta_batch=meta_batch,
                           learning_rate=learning_rate,
                           first_forward=first_forward)


def real_gradient(learner: Learner, meta_params, loss_vjp: Callable,
                  weight_inputs):
  """This device's gradient of sum_k mean_b(w_bk L_bk) w.r.t. the backbone,
  with weights (B, K) from the weight net at `meta_params` on
  `weight_inputs` (`train_forward`'s) as constants. Returns (gradient,
  weights)."""
  weights = jax.lax.stop_gradient(
      weight_fn(learner)(meta_params, *weight_inputs))
  grads, = loss_vjp(weights / weights.shape[0])
  return grads, weights


def l2w_half_step(learner: Learner, state: TrainState, train_images,
                  train_labels, meta_images, meta_labels, learning_rate,
                  meta_learning_rate, with_meta: bool = True):
  """One half of an L2W iteration. Returns (new_state, metrics).

  Images NHWC, labels int (B,). `learning_rate` drives the real and the
  virtual step, `meta_learning_rate` the weight net's Adam. `state.step` is
  not advanced (an iteration has two halves). Both gradients pass through
  `learner.reduce_grads` before their optimizer steps, the moved running
  statistics through `learner.reduce_batch_stats`. Metrics: `losses` (B, K)
  per-sample CE of the train half, `weights` (B, K), `confidences` (B, K)
  each exit's softmax maximum, `train_loss`,
  `loss_per_exit` and `weight_per_exit` (K,) batch means, `correct` (K,)
  top-1 hits, and with a meta step `meta_loss`, `pseudo_weights` (B, K),
  `exit_assignment` (B_meta,), `meta_grads` (as applied).
  """
  losses, loss_vjp, exit_logits, new_batch_stats, weight_inputs = (
      train_forward(learner, state, train_images, train_labels))
  # Ablations whose weights are not learned skip the meta step ('frozen':
  # as a meta learning rate of 0, without its cost).
  with_meta = with_meta and learner.option(OPTION).learns_weights
  metrics = {}
  meta_params, meta_opt_state = state.meta_params, state.meta_opt_state
  if with_meta:
    (meta_loss, (pseudo_weights, assignment)), meta_grads = meta_gradient(
        learner, state, (losses, loss_vjp, exit_logits),
        (train_images, train_labels), (meta_images, meta_labels),
        learning_rate)
    meta_grads = learner.reduce_grads(meta_grads)
    meta_params, meta_opt_state = apply_optimizer(
        learner.meta_tx, meta_grads, meta_opt_state, meta_params,
        meta_learning_rate)
    metrics.update(meta_loss=meta_loss, pseudo_weights=pseudo_weights,
                   exit_assignment=assignment, meta_grads=meta_grads)

  grads, weights = real_gradient(learner, meta_params, loss_vjp,
                                 weight_inputs)
  params, opt_state = apply_optimizer(learner.tx, learner.reduce_grads(grads),
                                      state.opt_state, state.params,
                                      learning_rate)
  metrics.update(
      losses=losses, weights=weights,
      train_loss=weighted_loss(weights, losses),
      confidences=weighting.exit_confidences(
          jax.lax.stop_gradient(exit_logits)),
      loss_per_exit=jnp.mean(losses, axis=0),
      weight_per_exit=jnp.mean(weights, axis=0),
      correct=top1_hits(exit_logits, train_labels))
  new_state = state.replace(
      params=params, batch_stats=learner.reduce_batch_stats(new_batch_stats),
      opt_state=opt_state, meta_params=meta_params,
      meta_opt_state=meta_opt_state)
  return new_state, metrics


def l2w_iteration(half_step: Callable, state: TrainState, images, labels,
                  learning_rate, meta_learning_rate, with_meta: bool = True):
  """A whole L2W iteration: (train p1, meta p2) then (train p2, meta p1).

  `half_step` is `l2w_half_step` with the learner bound (usually jitted, with
  `with_meta` static). Returns (new_state with step + 1, (metrics1, metrics2)).
  """
  (x1, y1), (x2, y2) = split_halves(images, labels)
  state, first = half_step(state, x1, y1, x2, y2, learning_rate,
                           meta_learning_rate, with_meta)
  state, second = half_step(state, x2, y2, x1, y1, learning_rate,
                            meta_learning_rate, with_meta)
  return state.replace(step=state.step + 1), (first, second)


registry.register('l2w', l2w_half_step, uses_meta_step=True,
                  options=options_from_config,
                  weight_net=weight_net_from_config,
                  init_weight_net=init_weight_net)
