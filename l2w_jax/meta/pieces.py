"""The meta step's pluggable pieces by name, as `config.meta` selects them.

  meta.weight_net    'mlp': L2W-DEN's weight prediction network
                     (`models.WeightNet` on `meta.input`, then
                     `weighting.sample_weights`)
  meta.objective     'allocation': L2W-DEN's meta loss (each meta sample
                     allocated to one exit by confidence); 'vanilla': every
                     exit's CE on every meta sample (`meta.ablation=
                     'vanilla_objective'`)
  meta.inner_update  'optimizer': the virtual step is the real optax
                     optimizer's update, differentiated through

A fork registers its own piece from its module (`register_weight_net`,
`register_objective`, `register_inner_update`) and selects it as
`module:name`, e.g. `--config.meta.weight_net=examples.
confidence_weight_net:confidence`. Each builder receives the L2W-DEN
settings (`methods.l2w.L2WSettings`: epsilon, constraint, input_kind,
target_probs) and returns a function of `meta.api`'s signature.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from l2w_jax import plugins
from l2w_jax.meta import api
from l2w_jax.models import build_weight_net


@dataclasses.dataclass(frozen=True)
class WeightNetPiece:
  """A weight net: how to build it, initialise it and turn it into weights.

  Attributes:
    build: (config.meta, num_exits) -> the flax module.
    init: (module, rng, num_exits, dtype) -> its parameters.
    weight_fn: (module, settings) -> weight_fn(meta_params, losses (B, K),
      exit_logits K x (B, C)) -> weights (B, K), as `api.meta_loss` takes.
  """
  build: Callable
  init: Callable
  weight_fn: Callable


# name -> (piece, the module that registered it)
_WEIGHT_NETS: dict[str, tuple[WeightNetPiece, str]] = {}
_OBJECTIVES: dict[str, tuple[Callable, str]] = {}
_INNER_UPDATES: dict[str, tuple[Callable, str]] = {}


def _register(table: dict, kind: str, name: str, piece) -> None:
  """Called by a `register_*` function: the module registering is two
  frames up."""
  if name in table:
    raise ValueError(f'{kind} {name!r} is already registered')
  table[name] = (piece, plugins.caller_module(3))


def _get(table: dict, field: str, name: str):
  registered = plugins.import_registering_module(name, field)
  if registered not in table:
    raise ValueError(f'{field}: unknown {name!r}; available: '
                     f'{tuple(sorted(table))}')
  piece, module = table[registered]
  plugins.check_registered_by(name, module, field)
  return piece


def register_weight_net(name: str, build: Callable, init: Callable,
                        weight_fn: Callable) -> None:
  """Makes a weight net available as `config.meta.weight_net = name`."""
  _register(_WEIGHT_NETS, 'weight net', name,
            WeightNetPiece(build, init, weight_fn))


def register_objective(name: str, build: Callable) -> None:
  """`config.meta.objective = name`: `build(settings)` gives
  objective_fn(exit_logits, losses (B, K), labels) -> (scalar, aux)."""
  _register(_OBJECTIVES, 'meta objective', name, build)


def register_inner_update(name: str, build: Callable) -> None:
  """`config.meta.inner_update = name`: `build(optimizer)` gives
  inner_update(grads, opt_state, params, learning_rate) -> (params,
  opt_state), where `optimizer` is the real step's optax optimizer."""
  _register(_INNER_UPDATES, 'inner update', name, build)


def weight_net(name: str) -> WeightNetPiece:
  return _get(_WEIGHT_NETS, 'meta.weight_net', name)


def objective(name: str) -> Callable:
  return _get(_OBJECTIVES, 'meta.objective', name)


def inner_update(name: str) -> Callable:
  return _get(_INNER_UPDATES, 'meta.inner_update', name)


def _mlp_init(module, rng, num_exits: int, dtype):
  del num_exits
  return module.init(rng, jnp.zeros((1, module.num_inputs), dtype))['params']


def _mlp_weight_fn(module, settings) -> Callable:
  return api.default_weight_fn(module, settings.input_kind,
                               settings.constraint, settings.epsilon)


def _allocation(settings) -> Callable:
  return api.allocation_objective(settings.target_probs)


register_weight_net('mlp', build_weight_net, _mlp_init, _mlp_weight_fn)
register_objective('allocation', _allocation)
register_objective('vanilla', lambda settings: api.vanilla_objective())
register_inner_update('optimizer', api.optimizer_update)
