"""What every training method shares: the train state and the static learner.

A method's steps are pure functions of a `Learner` (networks, optimizers,
settings, the cross-device reductions) and a `TrainState` (everything that
changes). Methods with a meta step (L2W-DEN) also have a weight net and its
optimizer; the others carry neither.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import optax


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training."""
  step: jax.Array  # training iterations completed
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  # The weight net and its optimizer state; None for methods without one.
  meta_params: Any = None
  meta_opt_state: optax.OptState = None
  # State a training method keeps besides the networks (e.g. BoostNet's
  # moving averages of the stage losses); None for most methods.
  method_state: Any = None


COMPUTE_DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class Settings:
  """Hyper-parameters every method's step reads at trace time."""
  label_smoothing: float = 0.0
  # The backbone's activations; parameters, optimizer states and losses stay
  # in their own (float32) dtype.
  compute_dtype: str = 'float32'


def compute_dtype(settings: Settings):
  """None for float32 (no casts at all, so float64 fixtures stay float64)."""
  return None if settings.compute_dtype == 'float32' else settings.compute_dtype


def _unchanged(tree):
  return tree


@dataclasses.dataclass(frozen=True)
class Learner:
  """The static parts of training: networks, optimizers, settings, and how
  per-device results combine (identity on one device; the data-parallel step
  sets cross-device means, see `training.step`)."""
  model: nn.Module
  tx: optax.GradientTransformation
  settings: Settings = Settings()
  # The weight net and its optimizer, for methods with a meta step.
  weight_net: nn.Module | None = None
  meta_tx: optax.GradientTransformation | None = None
  reduce_grads: Callable = _unchanged  # both networks' gradients
  reduce_batch_stats: Callable = _unchanged  # moved running statistics
  # The configured training method and its static hyper-parameters (e.g.
  # IMTA's distillation temperature) as sorted (name, value) pairs.
  method_name: str = ''
  method_options: tuple = ()

  def option(self, name: str):
    """The method option `name` (KeyError naming the ones there are)."""
    options = dict(self.method_options)
    if name not in options:
      raise KeyError(f'method option {name!r} not set; set: {sorted(options)}')
    return options[name]
