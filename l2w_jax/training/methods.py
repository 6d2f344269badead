"""Training methods by name (`config.method`): a registry of steps.

A method trained in halves, as L2W-DEN trains (its uniform baseline too), is
one function with the signature of `l2w.l2w_half_step`:

  half_step(learner, state, train_images, train_labels, meta_images,
            meta_labels, learning_rate, meta_learning_rate, with_meta)
      -> (new_state, metrics)

run per device on each half of a batch (train on one half; the other half
is there for methods with a meta step). Its gradients go through
`learner.reduce_grads` and its moved BatchNorm statistics through
`learner.reduce_batch_stats`, which the sharded step sets to cross-device
reductions. Metrics must hold `train_loss` (scalar), `loss_per_exit`,
`weight_per_exit` (K,), `correct` (K,) top-1 hits, and `meta_loss` on meta
iterations; anything else (per-sample arrays) stays on the device.

A method trained on whole batches, as the other methods' originals do, is
`batch_step(learner, state, images, labels, learning_rate) -> (new_state,
metrics)`, run once per iteration on every device's whole shard, with the
same reductions and metrics.

Adding a method is `register('name', half_step, uses_meta_step=...)` or
`register('name', batch_step=..., uses_meta_step=False)`; `backbone` names
what the method changes in the backbone (e.g. gradient equilibrium).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from l2w_jax.meta import l2w
from l2w_jax.methods import boosting


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered training method: a half step or a whole-batch step."""
  name: str
  half_step: Callable | None
  uses_meta_step: bool  # whether `meta.interval` iterations do a meta step
  batch_step: Callable | None = None
  # config -> the MSDNetConfig fields the method sets (e.g. gradient
  # equilibrium, BoostNet's reweights); None: the backbone as configured.
  backbone: Callable | None = None


_METHODS: dict[str, Method] = {}


def register(name: str, half_step: Callable | None = None, *,
             uses_meta_step: bool, batch_step: Callable | None = None,
             backbone: Callable | None = None) -> None:
  """Makes a step available as `config.method = name` (exactly one of
  `half_step` and `batch_step`)."""
  if name in _METHODS:
    raise ValueError(f'method {name!r} is already registered')
  if (half_step is None) == (batch_step is None):
    raise ValueError(f'method {name!r}: give exactly one of half_step and '
                     'batch_step')
  _METHODS[name] = Method(name, half_step, uses_meta_step, batch_step,
                          backbone)


def available() -> tuple[str, ...]:
  return tuple(sorted(_METHODS))


def get(name: str) -> Method:
  """The method called `name`; ValueError listing the available ones."""
  if name not in _METHODS:
    raise ValueError(f'method: unknown training method {name!r}; available: '
                     f'{available()}')
  return _METHODS[name]


def _uniform_half_step(learner, state, train_images, train_labels,
                       meta_images, meta_labels, learning_rate,
                       meta_learning_rate, with_meta):
  del meta_images, meta_labels, meta_learning_rate, with_meta
  return l2w.uniform_half_step(learner, state, train_images, train_labels,
                               learning_rate)


register('l2w', l2w.l2w_half_step, uses_meta_step=True)
register('uniform', _uniform_half_step, uses_meta_step=False)


def _boostnet_backbone(config) -> dict:
  r = config.boostnet.reweight
  reweight = boosting.reweights(r, config.model.n_blocks)
  if any(not 0.0 <= v <= 1.0 for v in reweight):
    raise ValueError(f'boostnet.reweight: each r must be in [0, 1], got {r}')
  return {'gradient_equilibrium': True, 'ensemble_reweight': reweight}


register('boostnet', batch_step=boosting.boostnet_step, uses_meta_step=False,
         backbone=_boostnet_backbone)
