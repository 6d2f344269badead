"""Training methods by name (`config.method`): a registry of half steps.

A method is one function with the signature of `l2w.l2w_half_step`:

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

Adding a method is `register('name', half_step, uses_meta_step=...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from l2w_jax.meta import l2w


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered training method."""
  name: str
  half_step: Callable
  uses_meta_step: bool  # whether `meta.interval` iterations do a meta step


_METHODS: dict[str, Method] = {}


def register(name: str, half_step: Callable, *, uses_meta_step: bool) -> None:
  """Makes `half_step` available as `config.method = name`."""
  if name in _METHODS:
    raise ValueError(f'method {name!r} is already registered')
  _METHODS[name] = Method(name, half_step, uses_meta_step)


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
