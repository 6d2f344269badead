"""Assembling the static `Learner` and an initial `TrainState` from a config."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2w_jax.meta import api, weighting
from l2w_jax.meta.l2w import COMPUTE_DTYPES, L2WSettings, Learner, TrainState
from l2w_jax.models import build_model, build_weight_net
from l2w_jax.optim import torch_adam, torch_sgd
from l2w_jax.training import methods


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
  method = methods.get(config.method)
  model = build_model(config, **(method.backbone(config) if method.backbone
                                 else {}))
  return method.network(model) if method.network else model


def build_learner(config) -> Learner:
  """Networks, optimizers and L2W settings from `config`."""
  model = method_model(config)
  num_exits = model.num_exits
  meta = config.meta
  weighting.centre(jnp.zeros((1, 1)), meta.constraint)  # validates the name
  if meta.interval < 1:
    raise ValueError(f'meta.interval: must be >= 1, got {meta.interval}')
  settings = L2WSettings(
      epsilon=float(meta.epsilon),
      constraint=meta.constraint,
      input_kind=meta.input,
      target_probs=tuple(
          float(q) for q in weighting.target_probs(num_exits,
                                                   meta.target_p_index)),
      label_smoothing=float(config.train.get('label_smoothing', 0.0)),
      compute_dtype=_compute_dtype(config),
      meta_options=api.MetaOptions(
          inner_steps=meta.get('inner_steps', 1),
          first_order=bool(meta.get('first_order', False)),
          virtual_params=meta.get('virtual_params', 'all')))
  method = methods.get(config.method)
  options = method.options(config) if method.options else {}
  return Learner(
      model=model,
      weight_net=build_weight_net(meta, num_exits),
      tx=torch_sgd(config.train.lr, config.train.momentum,
                   config.train.weight_decay),
      meta_tx=torch_adam(meta.lr, meta.weight_decay),
      settings=settings,
      method_name=config.method,
      method_options=tuple(sorted(options.items())))


def init_train_state(learner: Learner, rng: jax.Array, image_shape,
                     dtype=jnp.float32) -> TrainState:
  """Fresh variables and optimizer states; `image_shape` is (H, W, C)."""
  model_rng, meta_rng = jax.random.split(rng)
  variables = learner.model.init(model_rng,
                                 jnp.zeros((1,) + tuple(image_shape), dtype),
                                 train=False)
  num_inputs = learner.weight_net.num_inputs
  meta_variables = learner.weight_net.init(meta_rng,
                                           jnp.zeros((1, num_inputs), dtype))
  params = variables['params']
  meta_params = meta_variables['params']
  method = methods.get(learner.method_name) if learner.method_name else None
  method_state = (method.initial_state(learner, dtype) if method and
                  method.initial_state else None)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables['batch_stats'],
      opt_state=learner.tx.init(params),
      meta_params=meta_params,
      meta_opt_state=learner.meta_tx.init(meta_params),
      method_state=method_state)
