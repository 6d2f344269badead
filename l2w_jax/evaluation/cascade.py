"""Real early-exit inference: later blocks run only on samples still unsure.

The original (and the budgeted curve) compute every exit for every sample and
simulate the exiting afterwards. `Cascade` does it for real: stage k runs
the backbone's stage k and exit k (`MultiExitBackbone.cascade_stage`:
MSDNet's block k; RANet's blocks between exits k-1 and k, starting new
scale flows as needed; BoostNet's ensemble carried along) on the samples
that have not exited, the confident ones (max softmax >= threshold k,
decided in the stage's program) leave with that exit's prediction, and
the carry of the rest (every array in it) is gathered for stage k + 1 when
that lets the stage run on a smaller bucket. To keep
shapes static, the active samples are padded up to a bucket size (powers of
two, then multiples of an eighth of the batch), so each (stage, bucket)
compiles once and nothing recompiles per batch. In eval mode BatchNorm uses
running statistics, so a sample's outputs do not depend on its batch
companions: the cascade's predictions are those of simulated exiting with
the same thresholds (up to floating-point rounding of different batch
shapes).

By default the variables are compiled into the programs as constants, as
a served model's are: passing them as arguments costs about 0.4 ms per call
for the 560 arrays of the CIFAR MSDNet on CPU (more than a small stage's
run time), and the full network it is compared with is compiled the same
way. Each program then holds its own copy of its stage's weights (one per
bucket); for large networks `variables_as_constants=False` passes them
instead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def bucket_sizes(max_batch: int, steps: int = 8) -> tuple[int, ...]:
  """The row counts a stage is compiled for: powers of two up to the step
  (the largest power of two <= max_batch / steps), then multiples of the
  step, then `max_batch`. Padding n active samples up to their bucket adds
  fewer than min(n, step) rows, so a stage never does more than 1/steps of
  the full batch's work on padding."""
  if max_batch < 1:
    raise ValueError(f'max_batch must be >= 1, got {max_batch}')
  step = 1
  while 2 * step * steps <= max_batch:
    step *= 2
  sizes, size = [], 1
  while size < step:
    sizes.append(size)
    size *= 2
  sizes.extend(range(step, max_batch, step))
  return tuple(sizes) + (max_batch,)


def _bucket(n: int, sizes: Sequence[int]) -> int:
  return next(s for s in sizes if s >= n)


def _start(images):
  """The carry of stage 0 (see `MultiExitBackbone.cascade_stage`)."""
  return images, None


def _stage(model: nn.Module, index: int, variables, carry):
  """Stage `index` and its exit: carry -> (carry for the next stage, conf,
  pred). The model's `cascade_stage` says what its exit predicts with
  (BoostNet's ensemble, carried from stage to stage, or the exit's own
  logits)."""
  carry, logits = model.apply(
      variables, carry, method=lambda m, c: m.cascade_stage(index, c))
  confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
  return carry, confidence, jnp.argmax(logits, axis=-1)


def _stage_and_decide(model: nn.Module, index: int, variables, carry,
                      thresholds):
  """Stage `index` and its exit decision, in one program: carry (rows,
  ...) and thresholds (K,) -> (carry for the next stage (None after the
  last), leave (rows,) bool, prediction (rows,)). At the last exit
  every sample leaves."""
  carry, confidence, prediction = _stage(model, index, variables, carry)
  if index == model.num_exits - 1:
    return None, jnp.ones(confidence.shape, bool), prediction
  return carry, confidence >= thresholds[index], prediction


def _gather(features, rows):
  """Keeps rows (bucket,) of every scale's features (and of Q, if any)."""
  return jax.tree_util.tree_map(lambda f: jnp.take(f, rows, axis=0), features)


@dataclasses.dataclass
class CascadeOutput:
  """Per-sample prediction and exit index (0-based); for each stage that
  ran, the samples still active and the rows it computed (their bucket)."""
  predictions: np.ndarray
  exits: np.ndarray
  samples_per_stage: list[int]
  rows_per_stage: list[int]


def _check_stageable(model: nn.Module) -> None:
  """ValueError unless `model` runs stage by stage: a
  `models.MultiExitBackbone` (MSDNet, RANet, plain or boosted)."""
  if not hasattr(model, 'cascade_stage'):
    raise ValueError(
        'the real cascade runs a multi-exit backbone (models.'
        f'MultiExitBackbone) stage by stage; {type(model).__name__} is not '
        'one (IMTA\'s heads feed each other through ISC); use '
        '--mode=budgeted for its simulated early exits')


def _checked_thresholds(model: nn.Module, thresholds) -> np.ndarray:
  """Thresholds as float32 (K,); ValueError naming the shape otherwise."""
  thresholds = np.asarray(thresholds, dtype=np.float32)
  if thresholds.shape != (model.num_exits,):
    raise ValueError(f'need {model.num_exits} thresholds (one per exit), '
                     f'got shape {thresholds.shape}')
  return thresholds


def _compiled(fn, variables, as_constants: bool):
  """jit of fn(variables, *args) as a function of *args: the variables
  compiled in as constants, or passed on each call."""
  if as_constants:
    return jax.jit(functools.partial(fn, variables))
  compiled = jax.jit(fn)
  return lambda *args: compiled(variables, *args)


class _Thresholded:
  """Holds validated thresholds and their copy on the device, so that a call
  does not transfer them again."""

  model: nn.Module

  @property
  def thresholds(self) -> np.ndarray:
    return self._thresholds

  @thresholds.setter
  def thresholds(self, value) -> None:
    self._thresholds = _checked_thresholds(self.model, value)
    self._device_thresholds = jnp.asarray(self._thresholds)


class Cascade(_Thresholded):
  """Early-exit inference of a multi-exit model with fixed thresholds, in
  batches of up to `max_batch` images."""

  def __init__(self, model: nn.Module, variables, thresholds,
               max_batch: int, variables_as_constants: bool = True):
    _check_stageable(model)
    self.model = model
    self.variables = variables
    self.num_exits = model.num_exits
    self.thresholds = thresholds
    self.buckets = bucket_sizes(max_batch)
    self._stages = [_compiled(functools.partial(_stage_and_decide, model, k),
                              variables, variables_as_constants)
                    for k in range(self.num_exits)]
    self._gather = jax.jit(_gather)

  def __call__(self, images) -> CascadeOutput:
    """Images (N, H, W, C), N <= max_batch -> predictions and exits (N,).

    The carry of the samples still active is gathered into a smaller
    bucket only when their count fits one; otherwise the next stage runs on
    the rows it has (the exited ones included, as padding), which costs no
    more than that bucket would and saves the gather."""
    n = images.shape[0]
    if n > self.buckets[-1]:
      raise ValueError(f'batch of {n} exceeds max_batch {self.buckets[-1]}')
    predictions = np.zeros((n,), np.int64)
    exits = np.full((n,), self.num_exits - 1, np.int64)
    active = np.arange(n)  # the original positions of the active samples
    slots = np.arange(n)  # and their rows in `carry`
    rows = _bucket(n, self.buckets)
    carry = _start(jnp.asarray(_pad_rows(np.asarray(images), rows)))
    sizes, computed = [], []
    for k in range(self.num_exits):
      sizes.append(len(active))
      computed.append(rows)
      carry, leave, prediction = self._stages[k](carry,
                                                 self._device_thresholds)
      leave = np.asarray(leave)[slots]
      predictions[active[leave]] = np.asarray(prediction)[slots[leave]]
      exits[active[leave]] = k
      active, slots = active[~leave], slots[~leave]
      if active.size == 0:
        break
      bucket = _bucket(active.size, self.buckets)
      if bucket < rows:
        picked = np.concatenate([slots, np.zeros(bucket - slots.size,
                                                 slots.dtype)])
        carry = self._gather(carry, jnp.asarray(picked))
        rows, slots = bucket, np.arange(active.size)
    return CascadeOutput(predictions, exits, sizes, computed)

  def warm_up(self, image_shape) -> None:
    """Compiles every (stage, bucket) by running a cascade that never
    exits from each bucket size, and every gather from a bucket to a
    smaller one, so that no call compiles afterwards."""
    never = jnp.full((self.num_exits,), jnp.inf, jnp.float32)
    for size in self.buckets:
      carry = _start(jnp.zeros((size,) + tuple(image_shape)))
      for k in range(self.num_exits):
        carry, _, _ = self._stages[k](carry, never)
        if carry is not None:
          for smaller in (b for b in self.buckets if b < size):
            self._gather(carry, jnp.zeros((smaller,), jnp.int32))
      jax.block_until_ready(carry)


def _exit_early(model: nn.Module, variables, image, thresholds):
  """One image through nested `lax.cond`s: stage k+1 is only executed when
  stage k is not confident. Returns (prediction, exit index) scalars."""

  def from_stage(k, features):
    features, confidence, prediction = _stage(model, k, variables, features)
    if k == model.num_exits - 1:
      return prediction[0].astype(jnp.int32), jnp.int32(k)
    return jax.lax.cond(
        confidence[0] >= thresholds[k],
        lambda f: (prediction[0].astype(jnp.int32), jnp.int32(k)),
        lambda f: from_stage(k + 1, f), features)

  return from_stage(0, _start(image))


class SingleImageCascade(_Thresholded):
  """Latency mode: one image per call, the whole cascade in one program.

  The exits are decided on the device (`lax.cond`), so there is no host
  round trip between stages and the skipped stages are never executed.
  """

  def __init__(self, model: nn.Module, variables, thresholds,
               variables_as_constants: bool = True):
    _check_stageable(model)
    self.model = model
    self.variables = variables
    self.thresholds = thresholds
    self._run = _compiled(functools.partial(_exit_early, model), variables,
                          variables_as_constants)

  def __call__(self, image) -> tuple[jax.Array, jax.Array]:
    """Image (1, H, W, C) -> (prediction, exit index) device scalars."""
    if image.shape[0] != 1:
      raise ValueError(f'latency mode takes one image, got {image.shape[0]}')
    return self._run(image, self._device_thresholds)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  if x.shape[0] == size:
    return x
  pad = np.zeros((size - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


def simulated_exits(confidence: np.ndarray, prediction: np.ndarray,
                    thresholds) -> tuple[np.ndarray, np.ndarray]:
  """What simulated exiting gives: (K, N) outputs -> predictions, exits."""
  from l2w_jax.evaluation.budgeted import exit_indices  # pylint: disable=g-import-not-at-top
  exits = exit_indices(confidence, thresholds)
  return prediction[exits, np.arange(exits.shape[0])], exits
