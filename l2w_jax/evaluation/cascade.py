"""Real early-exit inference: later blocks run only on samples still unsure.

The original (and the budgeted curve) compute every exit for every sample and
simulate the exiting afterwards. `Cascade` does it for real: stage k runs
the backbone's stage k (`run_stage`: MSDNet's block k; RANet's blocks
between exits k-1 and k, starting new scale flows as needed) and classifier
k on the samples that have not exited, the confident ones (max softmax >=
threshold k) leave with that exit's prediction, and the carry of the rest
(every array in it) is gathered for stage k + 1. To keep shapes static,
the active samples are padded up to a bucket size (powers of two up to the
batch size), so each (stage, bucket) compiles once and nothing recompiles
per batch. In eval mode BatchNorm uses running statistics, so a sample's
outputs do not depend on its batch companions: the cascade's predictions are
those of simulated exiting with the same thresholds (up to floating-point
rounding of different batch shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
  """Powers of two below `max_batch`, and `max_batch` itself."""
  sizes, size = [], 1
  while size < max_batch:
    sizes.append(size)
    size *= 2
  return tuple(sizes) + (max_batch,)


def _bucket(n: int, sizes: Sequence[int]) -> int:
  return next(s for s in sizes if s >= n)


def _reweight(model: nn.Module) -> tuple[float, ...]:
  """BoostNet's reweights if the model predicts with ensembles, else ()."""
  return tuple(getattr(getattr(model, 'cfg', None), 'ensemble_reweight', ()))


def _start(model: nn.Module, images):
  """The carry of stage 0: (images, the running ensemble Q or None)."""
  if not _reweight(model):
    return images, None
  return images, jnp.zeros((images.shape[0], model.cfg.num_classes),
                           images.dtype)


def _stage(model: nn.Module, index: int, variables, carry):
  """Block `index` and its classifier: (features, Q_{k-1}) -> ((features,
  Q_k), conf, pred). For BoostNet the exit predicts with the ensemble
  Q_k = o_k + Q_{k-1} r_k, carried from stage to stage; otherwise Q is None
  and the exit predicts with its own logits."""
  features, ensemble = carry

  def run(module, x):
    out = module.run_stage(index, x, False)
    return out, module.exit_logits(index, out, False)

  features, logits = model.apply(variables, features, method=run)
  reweight = _reweight(model)
  if reweight:
    logits = logits if index == 0 else logits + ensemble * reweight[index]
    ensemble = logits
  confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
  return (features, ensemble), confidence, jnp.argmax(logits, axis=-1)


def _gather(features, rows):
  """Keeps rows (bucket,) of every scale's features (and of Q, if any)."""
  return jax.tree_util.tree_map(lambda f: jnp.take(f, rows, axis=0), features)


@dataclasses.dataclass
class CascadeOutput:
  """Per-sample prediction and exit index (0-based), and stage sizes."""
  predictions: np.ndarray
  exits: np.ndarray
  samples_per_stage: list[int]


def _check_stageable(model: nn.Module) -> None:
  """ValueError unless `model` runs stage by stage (`run_stage`,
  `exit_logits`): an MSDNet or a RANet, plain or boosted."""
  if not hasattr(model, 'run_stage'):
    raise ValueError(
        'the real cascade runs a backbone (MSDNet, RANet) stage by stage; '
        f'{type(model).__name__} (IMTA\'s heads fed through ISC) is not '
        'supported yet; use --mode=budgeted for its simulated early exits')


class Cascade:
  """Early-exit inference of a multi-exit model with fixed thresholds."""

  def __init__(self, model: nn.Module, variables, thresholds,
               max_batch: int):
    _check_stageable(model)
    self.model = model
    self.variables = variables
    self.num_exits = model.num_exits
    thresholds = np.asarray(thresholds, dtype=np.float32)
    if thresholds.shape != (self.num_exits,):
      raise ValueError(f'need {self.num_exits} thresholds (one per exit), '
                       f'got shape {thresholds.shape}')
    self.thresholds = thresholds
    self.buckets = bucket_sizes(max_batch)
    self._stages = [jax.jit(functools.partial(_stage, model, k))
                    for k in range(self.num_exits)]
    self._gather = jax.jit(_gather)

  def __call__(self, images) -> CascadeOutput:
    """Images (N, H, W, C), N <= max_batch -> predictions and exits (N,)."""
    n = images.shape[0]
    if n > self.buckets[-1]:
      raise ValueError(f'batch of {n} exceeds max_batch {self.buckets[-1]}')
    predictions = np.zeros((n,), np.int64)
    exits = np.full((n,), self.num_exits - 1, np.int64)
    active = np.arange(n)  # original positions of the rows in `features`
    size = _bucket(n, self.buckets)
    features = _start(self.model,
                      jnp.asarray(_pad_rows(np.asarray(images), size)))
    sizes = []
    for k in range(self.num_exits):
      sizes.append(len(active))
      features, confidence, prediction = self._stages[k](self.variables,
                                                         features)
      confidence = np.asarray(confidence)[:len(active)]
      prediction = np.asarray(prediction)[:len(active)]
      leave = (confidence >= self.thresholds[k] if k < self.num_exits - 1
               else np.ones(len(active), bool))
      predictions[active[leave]] = prediction[leave]
      exits[active[leave]] = k
      stay = np.flatnonzero(~leave)
      if stay.size == 0:
        break
      active = active[stay]
      size = _bucket(stay.size, self.buckets)
      rows = np.concatenate([stay, np.zeros(size - stay.size, stay.dtype)])
      features = self._gather(features, jnp.asarray(rows))
    return CascadeOutput(predictions, exits, sizes)

  def warm_up(self, image_shape) -> None:
    """Compiles every (stage, bucket) by running a cascade that never exits."""
    saved = self.thresholds
    self.thresholds = np.full_like(saved, np.inf)
    try:
      for size in self.buckets:
        self(np.zeros((size,) + tuple(image_shape), np.float32))
    finally:
      self.thresholds = saved


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

  return from_stage(0, _start(model, image))


class SingleImageCascade:
  """Latency mode: one image per call, the whole cascade in one program.

  The exits are decided on the device (`lax.cond`), so there is no host
  round trip between stages and the skipped stages are never executed.
  """

  def __init__(self, model: nn.Module, variables, thresholds):
    _check_stageable(model)
    self.model = model
    self.variables = variables
    self.thresholds = np.asarray(thresholds, np.float32)
    if self.thresholds.shape != (model.num_exits,):
      raise ValueError(f'need {model.num_exits} thresholds (one per exit), '
                       f'got shape {self.thresholds.shape}')
    self._run = jax.jit(functools.partial(_exit_early, model))

  def __call__(self, image) -> tuple[jax.Array, jax.Array]:
    """Image (1, H, W, C) -> (prediction, exit index) device scalars."""
    if image.shape[0] != 1:
      raise ValueError(f'latency mode takes one image, got {image.shape[0]}')
    return self._run(self.variables, image, jnp.asarray(self.thresholds))


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


def time_per_image(fn, batches: Sequence[np.ndarray], repeats: int = 5
                   ) -> float:
  """Median over repeats of the wall-clock seconds per image of fn(batch)."""
  n = sum(b.shape[0] for b in batches)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for batch in batches:
      jax.block_until_ready(fn(batch))
    times.append((time.perf_counter() - start) / n)
  return float(np.median(times))


def compare_with_full_network(full, cascade, single, batches, singles
                              ) -> dict[str, float]:
  """Seconds per image of the full network and of the cascades, in batches
  and one image at a time; each pair timed back to back so that load
  changes on a shared machine hit both."""
  return {
      'full_batch_s': time_per_image(full, batches),
      'cascade_batch_s': time_per_image(cascade, batches),
      'full_single_s': time_per_image(full, singles),
      'cascade_single_s': time_per_image(single, singles),
  }
