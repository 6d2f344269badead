"""Assembling the static `Learner` and an initial `TrainState` from a config."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2w_jax.models import build_model
from l2w_jax.optim import torch_sgd
from l2w_jax.training import registry
from l2w_jax.training.state import COMPUTE_DTYPES, Learner, Settings, TrainState


def _compute_dtype(config) -> str:
  name = config.train.get('compute_dtype', 'float32')
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'train.compute_dtype: unknown dtype {name!r}; use one '
                     f'of {COMPUTE_DTYPES}')
  return name


def method_model(config):
  """The network `config.method` trains and evaluates: the backbone of
  `config.model` with the method's changes (e.g. BoostNet's gradient
  equilibrium and ensemble outputs), inside the method's own network if it
  has one (IMTA's heads)."""
  method = registry.get(config.method)
  model = build_model(config, **(method.backbone(config) if method.backbone
                                 else {}))
  return method.network(model) if method.network else model


def build_learner(config) -> Learner:
  """Networks, optimizers, settings and the method's options from `config`
  (ValueError naming a bad field)."""
  method = registry.get(config.method)
  model = method_model(config)
  num_exits = model.num_exits
  settings = Settings(
      label_smoothing=float(config.train.get('label_smoothing', 0.0)),
      compute_dtype=_compute_dtype(config))
  options = method.options(config, num_exits) if method.options else {}
  weight_net, meta_tx = (method.weight_net(config, num_exits)
                         if method.weight_net else (None, None))
  return Learner(
      model=model,
      tx=torch_sgd(config.train.lr, config.train.momentum,
                   config.train.weight_decay),
      settings=settings, weight_net=weight_net, meta_tx=meta_tx,
      method_name=config.method,
      method_options=tuple(sorted(options.items())))


def init_train_state(learner: Learner, rng: jax.Array, image_shape,
                     dtype=jnp.float32) -> TrainState:
  """Fresh variables and optimizer states; `image_shape` is (H, W, C). The
  backbone's initialisation does not depend on whether the method has a
  weight net (the same key either way)."""
  model_rng, meta_rng = jax.random.split(rng)
  variables = learner.model.init(model_rng,
                                 jnp.zeros((1,) + tuple(image_shape), dtype),
                                 train=False)
  meta_params = None
  if learner.weight_net is not None:
    meta_params = _method_of(learner).init_weight_net(learner, meta_rng, dtype)
  return train_state_from(learner, variables, meta_params, dtype)


def _method_of(learner: Learner):
  if not learner.method_name:
    raise ValueError('a learner with a weight net or method state needs the '
                     'method_name that initialises them')
  return registry.get(learner.method_name)


def train_state_from(learner: Learner, variables: dict, meta_params=None,
                     dtype=jnp.float32) -> TrainState:
  """The state a run starts from, given its networks.

  Args:
    learner: the run's `Learner`.
    variables: the backbone's {'params', 'batch_stats'}.
    meta_params: the weight net's parameters (None: the method has none).
    dtype: the dtype of the method's own state (e.g. BoostNet's averages).

  Returns:
    A `TrainState` at iteration 0 with fresh optimizer states (zero SGD
    momentum, which is PyTorch's first-step rule; Adam at step 0), as the
    original's optimizers start.
  """
  params = variables['params']
  if (learner.weight_net is None) != (meta_params is None):
    raise ValueError('train_state_from: give meta_params exactly when the '
                     'learner has a weight net')
  method = _method_of(learner) if learner.method_name else None
  method_state = (method.initial_state(learner, dtype) if method and
                  method.initial_state else None)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables['batch_stats'],
      opt_state=learner.tx.init(params),
      meta_params=meta_params,
      meta_opt_state=(None if meta_params is None else
                      learner.meta_tx.init(meta_params)),
      method_state=method_state)
