"""The data-parallel training iteration of any registered method.

`make_iteration` returns f(state, images, labels, lr, meta_lr, with_meta,
phase=None) -> (state, per-step metrics) that takes this process's part of
a global batch (numpy); `phase` names the phase of a phased method. For a
method trained in halves (L2W and its uniform baseline) it hands every
device its own two halves and runs the method's half step twice
(train p1 / meta p2, then train p2 / meta p1), giving two metrics dicts; for
a whole-batch method (BoostNet, IMTA, ...) it runs one step on every device's
whole shard, giving one. Each step is one jitted `shard_map` over the mesh
(compiled once per `with_meta` value and phase); the state is replicated, and the
metrics it returns are reduced over devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from l2w_jax import parallel
from l2w_jax.meta import l2w
from l2w_jax.training import methods

AXIS = parallel.DATA_AXIS


def reduce_metrics(metrics: dict, num_local: int) -> dict:
  """Per-device half-step metrics -> the loop's replicated summaries: means
  of losses and weights, summed hits and image counts. Per-sample arrays
  are dropped (they never leave the device)."""
  out = {
      'train_loss': jax.lax.pmean(metrics['train_loss'], AXIS),
      'loss_per_exit': jax.lax.pmean(metrics['loss_per_exit'], AXIS),
      'weight_per_exit': jax.lax.pmean(metrics['weight_per_exit'], AXIS),
      'correct': jax.lax.psum(metrics['correct'], AXIS),
      'num_images': jax.lax.psum(jnp.asarray(num_local, jnp.int32), AXIS),
  }
  if 'meta_loss' in metrics:
    out['meta_loss'] = jax.lax.pmean(metrics['meta_loss'], AXIS)
  return out


def data_parallel_learner(learner: l2w.Learner,
                          bn_stats: str = 'device0') -> l2w.Learner:
  """`learner` with gradients averaged over 'data' and running statistics
  reduced by `bn_stats` (see `parallel.batch_stats_reduction`)."""
  return dataclasses.replace(
      learner, reduce_grads=parallel.pmean(),
      reduce_batch_stats=parallel.batch_stats_reduction(bn_stats))


def sharded_half_step(half_step: Callable, learner: l2w.Learner,
                      mesh) -> Callable:
  """`half_step` (the methods' signature) per device under `shard_map`,
  jitted with `with_meta` static (and remat's compiler options, see
  `parallel.compiler_options`); the input state is donated."""

  def per_device(state, xt, yt, xm, ym, lr, meta_lr, *, with_meta):
    state, metrics = half_step(learner, state, xt, yt, xm, ym, lr, meta_lr,
                               with_meta)
    return state, reduce_metrics(metrics, xt.shape[0])

  def step(state, xt, yt, xm, ym, lr, meta_lr, with_meta):
    batch = P(AXIS)
    return jax.shard_map(
        functools.partial(per_device, with_meta=with_meta), mesh=mesh,
        in_specs=(P(), batch, batch, batch, batch, P(), P()),
        out_specs=(P(), P()), check_vma=False)(state, xt, yt, xm, ym, lr,
                                               meta_lr)

  return jax.jit(step, static_argnames='with_meta', donate_argnums=0,
                 compiler_options=parallel.step_compiler_options(
                     learner.model, mesh))


def sharded_batch_step(batch_step: Callable, learner: l2w.Learner,
                       mesh) -> Callable:
  """A whole-batch step `batch_step(learner, state, images, labels, lr)` per
  device under `shard_map`, jitted; the input state is donated."""

  def per_device(state, images, labels, lr):
    state, metrics = batch_step(learner, state, images, labels, lr)
    return state, reduce_metrics(metrics, images.shape[0])

  def step(state, images, labels, lr):
    batch = P(AXIS)
    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=(P(), batch, batch, P()),
                         out_specs=(P(), P()), check_vma=False)(
                             state, images, labels, lr)

  return jax.jit(step, donate_argnums=0,
                 compiler_options=parallel.step_compiler_options(
                     learner.model, mesh))


def _batch_iteration(batch_step: Callable, learner: l2w.Learner, mesh):
  """The iteration of a whole-batch step: one step on every device's shard."""
  step = sharded_batch_step(batch_step, learner, mesh)

  def iteration(state, images, labels, lr, meta_lr, with_meta):
    del meta_lr, with_meta
    state, metrics = step(state, parallel.global_array(images, mesh),
                          parallel.global_array(labels, mesh), lr)
    return state.replace(step=state.step + 1), (metrics,)

  return iteration


def _halves_iteration(half_step: Callable, learner: l2w.Learner, mesh,
                      uses_meta_step: bool):
  """The iteration of a half step: (train p1, meta p2), (train p2, meta p1)
  on every device's own halves."""
  step = sharded_half_step(half_step, learner, mesh)
  num_local = parallel.local_device_count(mesh)

  def iteration(state, images, labels, lr, meta_lr, with_meta):
    halves = parallel.device_halves(images, labels, num_local)
    (x1, y1), (x2, y2) = [[parallel.global_array(a, mesh) for a in half]
                          for half in halves]
    with_meta = with_meta and uses_meta_step
    state, first = step(state, x1, y1, x2, y2, lr, meta_lr, with_meta)
    state, second = step(state, x2, y2, x1, y1, lr, meta_lr, with_meta)
    return state.replace(step=state.step + 1), (first, second)

  return iteration


def make_iteration(method_name: str, learner: l2w.Learner, mesh,
                   bn_stats: str = 'device0') -> Callable:
  """The whole iteration of `method_name` on `mesh` (see module doc); a
  phased method's iteration takes the phase's name as `phase` (each phase
  compiles when first reached)."""
  method = methods.get(method_name)
  learner = data_parallel_learner(learner, bn_stats)
  iterations = {
      step.name: (_batch_iteration(step.batch_step, learner, mesh)
                  if step.batch_step is not None else
                  _halves_iteration(step.half_step, learner, mesh,
                                    method.uses_meta_step))
      for step in method.steps}

  def iteration(state, images, labels, lr, meta_lr, with_meta, phase=None):
    if phase is None and len(iterations) == 1:
      phase = method.phases[0]
    if phase not in iterations:
      raise ValueError(f'{method_name}: phase must be one of '
                       f'{method.phases}, got {phase!r}')
    return iterations[phase](state, images, labels, lr, meta_lr, with_meta)

  return iteration
