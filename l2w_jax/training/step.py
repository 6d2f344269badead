"""The data-parallel training iteration of any registered method.

`make_iteration` returns f(state, images, labels, lr, meta_lr, with_meta,
phase=None) -> (state, per-step metrics). `images` and `labels` are this
process's part of a global batch, either as numpy arrays or already placed
on the devices (`parallel.prefetch_to_mesh`); `phase` names the phase of a
phased method. Every call runs ONE compiled program (per `with_meta` value
and phase) that does the whole iteration on every device's own rows:

* uint8 images are normalised there ((x / 255 - mean) / std, the pipeline's
  float32 arithmetic), so the batch crosses the host-device link as bytes;
* a method trained in halves (L2W-DEN, uniform weighting) splits each
  device's shard as `torch.chunk(2)` does (the first half gets ceil(b/2)
  rows) and runs the half step twice, (train p1 / meta p2) then (train p2 /
  meta p1), giving two metrics dicts; with equal halves the two calls are
  one `lax.scan` body, so the half step is traced once (and compiled once
  unless the scan is unrolled; see `unroll_halves`);
* a whole-batch method (BoostNet, IMTA, ...) runs one step on the shard,
  giving one metrics dict;
* the iteration counter moves on the device.

The state is replicated and donated; the metrics are reduced over devices.
Nothing is reordered or copied on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from l2w_jax import parallel
from l2w_jax.models import conv
from l2w_jax.models.inputs import model_input
from l2w_jax.training import registry
from l2w_jax.training.forward import split_halves
from l2w_jax.training.state import Learner

AXIS = parallel.DATA_AXIS


# Per-sample metrics a method's step may give, (B, ...) on each device.
PER_SAMPLE_METRICS = ('losses', 'weights', 'confidences', 'pseudo_weights',
                      'exit_assignment')


def reduce_metrics(metrics: dict, num_local: int,
                   mean: Callable = parallel.pmean(),
                   per_sample: bool = False) -> dict:
  """Per-device step metrics -> the loop's replicated summaries.

  Args:
    metrics: one device's metrics of a half step or a batch step.
    num_local: the images of that step on the device.
    mean: how values are averaged over devices (`parallel.pmean`).
    per_sample: also keep `PER_SAMPLE_METRICS`, gathered over the devices
      in batch order ((B_global, ...)), and the meta-gradient (already
      reduced); for inspection. Otherwise they never leave the device.

  Returns:
    Means of losses and weights, summed top-1 hits and image counts
    (integers: exact in any order), and with `per_sample` the above.
  """
  means = {name: metrics[name] for name in ('train_loss', 'loss_per_exit',
                                            'weight_per_exit', 'meta_loss')
           if name in metrics}
  if 'weights' in metrics and 'losses' in metrics:
    means['weight_moments'] = weight_moments(metrics['weights'],
                                             metrics['losses'])
  out = mean(means)
  out.update(correct=jax.lax.psum(metrics['correct'], AXIS),
             num_images=jax.lax.psum(jnp.asarray(num_local, jnp.int32), AXIS))
  if per_sample:
    out.update({name: jax.lax.all_gather(metrics[name], AXIS, tiled=True)
                for name in PER_SAMPLE_METRICS if name in metrics})
    if 'meta_grads' in metrics:
      out['meta_grads'] = metrics['meta_grads']
  return out


def weight_moments(weights: jax.Array, losses: jax.Array) -> jax.Array:
  """(5, K) per-exit batch means of w, w^2, L, L^2 and w * L, from
  weights and losses (B, K): moments that average over devices (equal
  local batches) and over a logging window into the weights' spread and
  their correlation with the loss (`metrics.weight_statistics`)."""
  w = weights.astype(jnp.float32)
  loss = jax.lax.stop_gradient(losses).astype(jnp.float32)
  return jnp.stack([jnp.mean(w, 0), jnp.mean(w * w, 0), jnp.mean(loss, 0),
                    jnp.mean(loss * loss, 0), jnp.mean(w * loss, 0)])


def data_parallel_learner(learner: Learner, bn_stats: str = 'device0',
                          reduction: str = 'all_reduce') -> Learner:
  """`learner` with gradients averaged over 'data' by `reduction` and
  running statistics reduced by `bn_stats` (see `parallel.pmean`,
  `parallel.batch_stats_reduction`)."""
  return dataclasses.replace(
      learner, reduce_grads=parallel.pmean(reduction=reduction),
      reduce_batch_stats=parallel.batch_stats_reduction(bn_stats, reduction))


def sharded_half_step(half_step: Callable, learner: Learner,
                      mesh) -> Callable:
  """One `half_step` (the methods' signature) per device under `shard_map`,
  on halves the caller has already placed, jitted with `with_meta` static
  (and remat's compiler options, see `parallel.compiler_options`); the input
  state is donated. The training loop runs whole iterations instead
  (`make_iteration`); this is for inspecting one half step."""

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


def _both_halves(half_step: Callable, learner: Learner, state, images,
                 labels, lr, meta_lr, with_meta: bool, to_input: Callable,
                 mean: Callable, unroll: bool, per_sample: bool = False):
  """(train p1, meta p2) then (train p2, meta p1) on one device's shard,
  halved as `torch.chunk(2)`; `to_input` makes each half the network's
  input, `mean` averages the metrics over devices; `unroll` unrolls the
  scan of equal halves (see `unroll_halves`). Returns (state, (metrics1,
  metrics2))."""
  n = images.shape[0]
  first = -(-n // 2)

  def half(state, xt, yt, xm, ym):
    state, metrics = half_step(learner, state, to_input(xt), yt,
                               to_input(xm), ym, lr, meta_lr, with_meta)
    return state, reduce_metrics(metrics, xt.shape[0], mean, per_sample)

  if 2 * first != n:  # unequal halves: two shapes, two traced calls
    (x1, y1), (x2, y2) = split_halves(images, labels)
    state, m1 = half(state, x1, y1, x2, y2)
    state, m2 = half(state, x2, y2, x1, y1)
    return state, (m1, m2)

  def body(state, index):
    def rows(a, which):
      return jax.lax.dynamic_slice_in_dim(a, which * first, first)
    return half(state, rows(images, index), rows(labels, index),
                rows(images, 1 - index), rows(labels, 1 - index))

  state, stacked = jax.lax.scan(body, state, jnp.arange(2), unroll=unroll)
  return state, tuple(jax.tree_util.tree_map(lambda m, i=i: m[i], stacked)
                      for i in range(2))


def unroll_halves(mesh, model) -> bool:
  """Whether the scan over the two halves is unrolled: on CPU when `model`
  runs JAX's own convolution derivatives, whose weight gradients XLA:CPU
  runs tens of times slower inside a while loop's body than outside one
  (the CIFAR-100 MSDNet's uniform iteration, batch 64, one device: 7.1 s in
  the loop against 0.78 s unrolled, benchmarks/step_time.py). With
  `models.conv`'s explicit rules (MSDNet's default on CPU) and off CPU the
  loop stays, and the half step is compiled once. A backbone without a
  `cfg.conv_gradients` counts as running JAX's rules. Traced once either
  way; the values are the same computation."""
  if mesh.devices.flat[0].platform != 'cpu':
    return False
  gradients = getattr(getattr(model, 'cfg', None), 'conv_gradients', 'lax')
  return not conv.uses_explicit_gradients(gradients)


def iteration_program(phase_step: registry.PhaseStep, learner: Learner,
                      mesh, uses_meta_step: bool,
                      input_norm: tuple | None = None,
                      reduction: str = 'all_reduce',
                      per_sample_metrics: bool = False) -> Callable:
  """The whole iteration of one phase as one jitted `shard_map`:
  program(state, images, labels, lr, meta_lr, with_meta) -> (state with
  step + 1, tuple of metrics dicts); `with_meta` is static, the state is
  donated. `learner` reduces its gradients over the mesh
  (`data_parallel_learner`); the metrics are averaged by `reduction` (see
  `parallel.pmean`). `input_norm` = (mean, std) normalises uint8 images on
  the device (see `model_input`)."""
  mean, std = input_norm if input_norm is not None else (None, None)
  metrics_mean = parallel.pmean(reduction=reduction)
  unroll = unroll_halves(mesh, learner.model)

  def to_input(images):
    return model_input(images, mean, std)

  def per_device(state, images, labels, lr, meta_lr, *, with_meta):
    if phase_step.batch_step is not None:
      state, metrics = phase_step.batch_step(learner, state,
                                             to_input(images), labels, lr)
      metrics = (reduce_metrics(metrics, images.shape[0], metrics_mean,
                                per_sample_metrics),)
    else:
      # Halved as bytes; each half is normalised where it is used.
      state, metrics = _both_halves(phase_step.half_step, learner, state,
                                    images, labels, lr, meta_lr,
                                    with_meta and uses_meta_step, to_input,
                                    metrics_mean, unroll, per_sample_metrics)
    return state.replace(step=state.step + 1), metrics

  def program(state, images, labels, lr, meta_lr, with_meta):
    batch = P(AXIS)
    return jax.shard_map(
        functools.partial(per_device, with_meta=with_meta), mesh=mesh,
        in_specs=(P(), batch, batch, P(), P()), out_specs=(P(), P()),
        check_vma=False)(state, images, labels, lr, meta_lr)

  return jax.jit(program, static_argnames='with_meta', donate_argnums=0,
                 compiler_options=parallel.step_compiler_options(
                     learner.model, mesh))


def make_iteration(method_name: str, learner: Learner, mesh,
                   bn_stats: str = 'device0',
                   input_norm: tuple | None = None,
                   reduction: str = 'all_reduce',
                   per_sample_metrics: bool = False) -> Callable:
  """The whole iteration of `method_name` on `mesh` (see module doc); a
  phased method's iteration takes the phase's name as `phase` (each phase
  compiles when first reached). `input_norm` = (mean, std) of the dataset,
  needed when the images arrive as uint8; `reduction` says how values are
  averaged over devices (`parallel.REDUCTIONS`, config
  `distributed.reduction`); `per_sample_metrics` keeps the per-sample
  metrics and the meta-gradient (`reduce_metrics`), for inspection."""
  method = registry.get(method_name)
  learner = data_parallel_learner(learner, bn_stats, reduction)
  programs = {step.name: iteration_program(step, learner, mesh,
                                           method.uses_meta_step, input_norm,
                                           reduction, per_sample_metrics)
              for step in method.steps}
  # Whether `with_meta` changes a phase's program (else one program, False).
  meta_matters = {step.name: method.uses_meta_step and
                  step.half_step is not None for step in method.steps}

  def iteration(state, images, labels, lr, meta_lr, with_meta, phase=None):
    if phase is None and len(programs) == 1:
      phase = method.phases[0]
    if phase not in programs:
      raise ValueError(f'{method_name}: phase must be one of '
                       f'{method.phases}, got {phase!r}')
    images, labels = (a if isinstance(a, jax.Array) else
                      parallel.global_array(np.asarray(a), mesh)
                      for a in (images, labels))
    return programs[phase](state, images, labels, lr, meta_lr,
                           bool(with_meta) and meta_matters[phase])

  iteration.programs = programs  # for inspection (lowering, HLO)
  return iteration
