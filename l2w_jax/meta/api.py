"""The meta-gradient of L2W-DEN as a function with pluggable pieces.

`meta_gradient` differentiates a meta objective on the meta half through
`inner_steps` virtual updates of the backbone on the training half, with
respect to the weight net's parameters phi:

  theta_0 = the backbone's parameters
  w_t     = weight_fn(phi, L(theta_t), logits(theta_t))
  g_t     = J_t^T w_t / B, J_t = dL/dtheta at theta_t  (w_t held constant:
            the gradient of sum_k mean_b(w_bk L_bk) with the weights fixed)
  theta_{t+1}, s_{t+1} = inner_update(g_t, s_t, theta_t, learning_rate)
  meta loss = objective_fn(logits(theta_T) on the meta half, ...)

Every piece is a plain function:

  losses_fn(params, images, labels) -> (losses (B, K), exit_logits K x (B, C))
      the backbone in train mode with its batch statistics as constants
      (`backbone_loss_fn` builds it from a Flax module);
  weight_fn(meta_params, losses (B, K), exit_logits) -> weights (B, K)
      (L2W-DEN: per-exit losses -> MLP -> tanh, centred;
      `default_weight_fn`); the inputs at theta_0 do not depend on phi;
      later ones do, through theta_t, and the meta-gradient includes it;
  objective_fn(exit_logits, losses (B, K), labels) -> (scalar, aux)
      on the virtually updated backbone's meta-half outputs (L2W-DEN:
      samples allocated to exits by confidence with target proportions;
      `allocation_objective`);
  inner_update(grads, opt_state, params, learning_rate) -> (params,
      opt_state)  (default: the real optax optimizer, differentiated
      through, as the original differentiates SGD with momentum and weight
      decay).

Options (`MetaOptions`): `inner_steps` unrolled virtual steps;
`first_order`, which treats each inner gradient g_t as a constant of the
backbone parameters (g_t then depends on phi through w_t only; with one
inner step this changes nothing, theta_0 does not depend on phi); and
`virtual_params`, 'all' or 'heads' (only the exits' classifiers
`classifier_*` move in the virtual steps).

With the defaults, one inner step and the train half's forward pass given
as `first_forward` (the training loop shares it with the real step), this
is exactly L2W-DEN's meta step: one forward and two VJPs per half.
Nothing is jitted here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from l2w_jax.meta import weighting
from l2w_jax.optim import apply_optimizer

VIRTUAL_PARAMS = ('all', 'heads')


@dataclasses.dataclass(frozen=True)
class MetaOptions:
  """How the virtual step is taken (config fields `meta.inner_steps`,
  `meta.first_order`, `meta.virtual_params`)."""
  inner_steps: int = 1
  first_order: bool = False
  virtual_params: str = 'all'

  def __post_init__(self):
    if not (isinstance(self.inner_steps, int) and self.inner_steps >= 1):
      raise ValueError(f'meta.inner_steps: must be an integer >= 1, got '
                       f'{self.inner_steps!r}')
    if self.virtual_params not in VIRTUAL_PARAMS:
      raise ValueError(f'meta.virtual_params: use one of {VIRTUAL_PARAMS}, '
                       f'got {self.virtual_params!r}')


def backbone_loss_fn(model, batch_stats, label_smoothing: float = 0.0,
                     compute_dtype=None) -> Callable:
  """The `losses_fn` of a multi-exit Flax module.

  The module runs in train mode with `batch_stats` as constants (the moved
  statistics are dropped).

  Args:
    model: a multi-exit Flax module; `apply(variables, images, train=True)`
      returns K exit logits, each (B, C).
    batch_stats: the module's BatchNorm statistics, held constant.
    label_smoothing: the smoothing of each exit's cross-entropy.
    compute_dtype: the dtype the module runs in (images cast to it, logits
      back to float32); None: the images' dtype.

  Returns:
    `losses_fn(params, images (B, H, W, 3), labels (B,))` ->
    (losses (B, K) per-sample per-exit CE, exit_logits K x (B, C)).
  """
  def losses_fn(params, images, labels):
    if compute_dtype is not None:
      images = images.astype(compute_dtype)
    exit_logits, _ = model.apply({'params': params,
                                  'batch_stats': batch_stats}, images,
                                 train=True, mutable=['batch_stats'])
    if compute_dtype is not None:
      exit_logits = [z.astype(jnp.float32) for z in exit_logits]
    return (weighting.per_exit_losses(exit_logits, labels, label_smoothing),
            exit_logits)
  return losses_fn


def default_weight_fn(weight_net, input_kind: str, constraint: str,
                      epsilon: float) -> Callable:
  """L2W-DEN's `weight_fn`: the weight net, then `sample_weights`.

  Args:
    weight_net: a Flax module mapping (B, K x inputs) to raw weights (B, K).
    input_kind: what the weight net reads per exit: 'loss', 'confidence'
      (the softmax maximum) or 'both'.
    constraint: how raw outputs become weights (`weighting.sample_weights`).
    epsilon: the constraint's floor.

  Returns:
    `weight_fn(meta_params, losses (B, K), exit_logits K x (B, C))` ->
    weights (B, K).
  """
  def weight_fn(meta_params, losses, exit_logits):
    inputs = weighting.weight_net_inputs(
        losses, weighting.exit_confidences(exit_logits), input_kind)
    raw = weight_net.apply({'params': meta_params}, inputs)
    return weighting.sample_weights(raw, constraint, epsilon)
  return weight_fn


def allocation_objective(target_probs) -> Callable:
  """L2W-DEN's meta objective: each meta sample allocated to one exit.

  Samples go to exits by confidence (`weighting.allocate_to_exits`) within
  the exits' quotas; the objective is the mean CE of each sample at its
  exit.

  Args:
    target_probs: (K,) the share of samples each exit should take (sums
      to 1).

  Returns:
    `objective_fn(exit_logits K x (B, C), losses (B, K), labels (B,))` ->
    (scalar meta loss, assignment (B,) int exit index).
  """
  def objective_fn(exit_logits, losses, labels):
    del labels
    assignment = weighting.assign_by_confidence(exit_logits, target_probs)
    return weighting.allocated_loss(losses, assignment), assignment
  return objective_fn


def vanilla_objective() -> Callable:
  """The meta objective without allocation (`meta.ablation=
  'vanilla_objective'`): every exit's mean CE over every meta sample,
  summed over the exits, sum_k mean_b L_bk.

  Returns:
    `objective_fn(exit_logits K x (B, C), losses (B, K), labels (B,))` ->
    (scalar meta loss, None).
  """
  def objective_fn(exit_logits, losses, labels):
    del exit_logits, labels
    return jnp.sum(jnp.mean(losses, axis=0)), None
  return objective_fn


def optimizer_update(optimizer: optax.GradientTransformation) -> Callable:
  """The inner update that is `optimizer`'s step, differentiated through
  (as the original differentiates SGD with momentum and weight decay).

  Args:
    optimizer: the real step's optax optimizer, built with
      `optax.inject_hyperparams` so that its learning rate can be set.

  Returns:
    `inner_update(grads, opt_state, params, learning_rate)` ->
    (params, opt_state), the trees of `params` and `opt_state`.
  """
  def inner_update(grads, opt_state, params, learning_rate):
    return apply_optimizer(optimizer, grads, opt_state, params, learning_rate)
  return inner_update


def head_mask(params) -> dict:
  """Which top-level modules are exit classifiers.

  Args:
    params: a backbone's parameter tree.

  Returns:
    {top-level module name: True for `classifier_*`, False otherwise}.
  """
  return {name: name.startswith('classifier_') for name in params}


def _only_heads(new_params, old_params):
  mask = head_mask(old_params)
  return {name: new_params[name] if mask[name] else old_params[name]
          for name in old_params}


def meta_loss(meta_params, *, params, opt_state, losses_fn: Callable,
              weight_fn: Callable, objective_fn: Callable, train_batch,
              meta_batch, learning_rate,
              inner_update: Callable | None = None,
              optimizer: optax.GradientTransformation | None = None,
              meta_losses_fn: Callable | None = None,
              options: MetaOptions = MetaOptions(),
              first_forward=None) -> tuple[jax.Array, tuple[Any, Any]]:
  """The meta objective as a function of `meta_params` (module docstring).

  Args:
    meta_params: the weight net's parameters phi.
    params: the backbone's parameters theta_0.
    opt_state: the backbone optimizer's state s_0.
    losses_fn: `(params, images, labels) -> (losses (B, K), exit_logits)`.
    weight_fn: `(meta_params, losses (B, K), exit_logits) -> (B, K)`.
    objective_fn: `(exit_logits, losses (B, K), labels (B,)) -> (scalar,
      aux)`.
    train_batch: (images (B, H, W, 3), labels (B,)), the virtual steps'.
    meta_batch: (images (B', H, W, 3), labels (B',)), the objective's.
    learning_rate: scalar, the virtual step's.
    inner_update: `(grads, opt_state, params, learning_rate) -> (params,
      opt_state)`; give this or `optimizer`.
    optimizer: an optax optimizer whose step is the inner update.
    meta_losses_fn: runs the meta half (default `losses_fn`), e.g. without
      the training half's label smoothing.
    options: `MetaOptions`.
    first_forward: (losses (B, K), loss_vjp, exit_logits) of `losses_fn` at
      `params` on the training half, reused for the first inner step.

  Returns:
    (meta loss (scalar), (the first inner step's weights (B, K),
    objective_fn's aux)).
  """
  if inner_update is None:
    if optimizer is None:
      raise ValueError('give the inner update or the optimizer')
    inner_update = optimizer_update(optimizer)
  train_images, train_labels = train_batch
  theta, state = params, opt_state
  first_weights = None
  for t in range(options.inner_steps):
    if t == 0 and first_forward is not None:
      losses, loss_vjp, exit_logits = first_forward
    else:
      at = jax.lax.stop_gradient(theta) if options.first_order else theta
      losses, loss_vjp, exit_logits = jax.vjp(
          lambda p: losses_fn(p, train_images, train_labels), at,
          has_aux=True)
    # The weights enter the inner gradient as the VJP's cotangent, so they
    # are constants of that differentiation without a stop_gradient (sum_k
    # mean_b(w L) is linear in the losses). From the second inner step on
    # the weight net's inputs depend on phi through theta_t, and the
    # meta-gradient follows that path too (unless first_order holds
    # theta_t constant).
    weights = weight_fn(meta_params, losses, exit_logits)
    if first_weights is None:
      first_weights = weights
    grads, = loss_vjp(weights / weights.shape[0])
    updated, state = inner_update(grads, state, theta, learning_rate)
    theta = (updated if options.virtual_params == 'all' else
             _only_heads(updated, theta))
  meta_images, meta_labels = meta_batch
  meta_losses, meta_logits = (meta_losses_fn or losses_fn)(theta, meta_images,
                                                           meta_labels)
  value, aux = objective_fn(meta_logits, meta_losses, meta_labels)
  return value, (first_weights, aux)


def meta_gradient(meta_params, **kwargs):
  """The meta-gradient: `meta_loss` differentiated through the virtual
  steps.

  Args:
    meta_params: the weight net's parameters phi.
    **kwargs: `meta_loss`'s keyword arguments.

  Returns:
    ((meta loss, (weights (B, K), aux)), d meta loss / d meta_params, a
    tree like `meta_params`).
  """
  return jax.value_and_grad(lambda mp: meta_loss(mp, **kwargs),
                            has_aux=True)(meta_params)
