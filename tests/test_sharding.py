"""Data parallelism on 8 simulated CPU devices (set up in conftest.py).

The sharded step must be the original's DDP semantics: every device splits
its own shard into halves, uses its own BatchNorm statistics and its own
exit allocation, and the two networks' gradients are averaged over devices.
"""

import dataclasses
import json
import math
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from l2w_jax import data
from l2w_jax import parallel
from l2w_jax.evaluation import report
from l2w_jax.methods import l2w
from l2w_jax.models.inputs import model_input
from l2w_jax.optim import apply_optimizer
from l2w_jax.training import forward
from l2w_jax.training import registry
from l2w_jax.training import step as step_lib
from l2w_jax.training import train
from l2w_jax.training.checkpoint import Checkpointer
from l2w_jax.training.learner import build_learner, init_train_state
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import (TINY_IMAGE, restore_state, tiny_config,
                        tiny_train_config)

NUM_DEVICES = 8
PER_DEVICE = 4
LR, META_LR = 0.3, 1e-2


def test_parallel_tests_see_eight_devices():
  assert jax.device_count() >= NUM_DEVICES


def _setup(sync_bn=False, dtype=jnp.float32, per_device=PER_DEVICE, **meta):
  config = tiny_config(**meta)
  config.train.sync_bn = sync_bn
  learner = build_learner(config)
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE, dtype)
  n = NUM_DEVICES * per_device
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(1),
                                        (n,) + TINY_IMAGE, dtype))
  labels = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (n,), 0, 5),
                      np.int32)
  return learner, state, images, labels


def _device_halves(images, labels):
  """((x1, y1), (x2, y2)) such that sharding x1 and x2 along 'data' hands
  every device its own halves (`torch.chunk(2)` of its consecutive rows)."""
  shards = _device_shards(images, labels)
  return tuple((np.concatenate([s[i][0] for s in shards]),
                np.concatenate([s[i][1] for s in shards])) for i in (0, 1))


def _device_shards(images, labels):
  """Device d's own halves: (x1, y1, x2, y2) of its consecutive rows."""
  return [forward.split_halves(x, y) for x, y in zip(
      np.split(images, NUM_DEVICES), np.split(labels, NUM_DEVICES),
      strict=True)]


def _copy(tree):
  """A copy of `tree` (the sharded step donates the state it is given)."""
  return jax.tree_util.tree_map(jnp.copy, tree)


def _mean(trees):
  return jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs), *trees)


def _reference_half(learner, state, shards, train_index):
  """One half step done device by device, then the gradients averaged and
  device 0's running statistics kept (DDP's buffer broadcast)."""

  @jax.jit
  def meta_part(state, xt, yt, xm, ym):
    losses, loss_vjp, logits, _, _ = l2w.train_forward(learner, state, xt, yt)
    _, grads = l2w.meta_gradient(learner, state, (losses, loss_vjp, logits),
                                 (xt, yt), (xm, ym), LR)
    return grads

  @jax.jit
  def real_part(state, meta_params, xt, yt):
    _, loss_vjp, _, stats, inputs = l2w.train_forward(learner, state, xt, yt)
    return l2w.real_gradient(learner, meta_params, loss_vjp, inputs)[0], stats

  # Jitted so that the optimizers' many small ops compile once, not one by one.
  @jax.jit
  def meta_update(state, meta_grads):
    return apply_optimizer(learner.meta_tx, _mean(meta_grads),
                           state.meta_opt_state, state.meta_params, META_LR)

  @jax.jit
  def real_update(state, grads):
    return apply_optimizer(learner.tx, _mean(grads), state.opt_state,
                           state.params, LR)

  halves = [(s[train_index], s[1 - train_index]) for s in shards]
  meta_params, meta_opt_state = state.meta_params, state.meta_opt_state
  if learner.option(l2w.OPTION).learns_weights:  # not under some ablations
    meta_params, meta_opt_state = meta_update(
        state, [meta_part(state, *t, *m) for t, m in halves])
  parts = [real_part(state, meta_params, *t) for t, _ in halves]
  params, opt_state = real_update(state, [g for g, _ in parts])
  return state.replace(params=params, batch_stats=parts[0][1],
                       opt_state=opt_state, meta_params=meta_params,
                       meta_opt_state=meta_opt_state)


@pytest.mark.long
@pytest.mark.parametrize('per_device,ablation', [
    (PER_DEVICE, 'none'), (3, 'none'), (PER_DEVICE, 'allocation'),
    (PER_DEVICE, 'vanilla_objective')])
def test_sharded_l2w_step_equals_each_device_alone_then_averaged(
    float64, per_device, ablation):
  """Even shards run the half step as one scan body; 3 rows a device make
  unequal halves (2 and 1, `torch.chunk(2)`), traced as two calls. The
  ablations on each device's own samples: one without a meta step
  (fixed_weights and frozen share its path) and one with."""
  del float64
  learner, state, images, labels = _setup(dtype=jnp.float64,
                                          per_device=per_device,
                                          ablation=ablation)
  mesh = parallel.make_mesh(NUM_DEVICES)
  iteration = step_lib.make_iteration('l2w', learner, mesh)
  sharded, (first, second) = iteration(
      jax.device_put(_copy(state), parallel.replicated(mesh)), images, labels,
      LR, META_LR, True)
  shards = _device_shards(images, labels)
  expected = _reference_half(learner, state, shards, 0)
  expected = _reference_half(learner, expected, shards, 1)
  chex.assert_trees_all_close(sharded.replace(step=expected.step), expected,
                              rtol=1e-9, atol=1e-12)
  assert int(sharded.step) == 1
  if ablation in ('allocation', 'fixed_weights', 'frozen'):
    assert 'meta_loss' not in first  # nothing meta-learned
    chex.assert_trees_all_equal(sharded.meta_params, state.meta_params)
    return
  # The meta step really ran on every device's own allocation.
  assert float(first['meta_loss']) > 0 and float(second['meta_loss']) > 0
  assert int(first['num_images']) == NUM_DEVICES * (-(-per_device // 2))
  assert int(second['num_images']) == NUM_DEVICES * (per_device // 2)


def test_uint8_images_are_normalised_on_the_device_as_the_pipeline_does():
  """Every byte value in every channel, with the CIFAR constants, compiled
  with and without XLA's optimisations: bit for bit the pipeline's float32
  arithmetic (augment.to_float_normalized)."""
  from l2w_jax.data import augment  # pylint: disable=g-import-not-at-top
  mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
  pixels = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1)
  pixels = pixels.reshape(1, 16, 16, 3)
  expected = augment.to_float_normalized(pixels, mean, std).numpy()
  optimised = jax.config.read('jax_disable_most_optimizations')
  try:
    for disable in (True, False):
      jax.config.update('jax_disable_most_optimizations', disable)
      got = jax.jit(lambda x: model_input(x, mean, std))(pixels)
      np.testing.assert_array_equal(np.asarray(got), expected)
  finally:
    jax.config.update('jax_disable_most_optimizations', optimised)
  floats = np.asarray(expected)
  assert model_input(floats, None, None) is floats
  with pytest.raises(ValueError, match='mean and std'):
    model_input(jnp.asarray(pixels), None, None)


def test_the_iteration_takes_bytes_and_is_one_program(monkeypatch):
  """uint8 images give the state float images normalised by the pipeline
  give, to the bit; each call places the process's rows once (images and
  labels, no halves built on the host) and runs one compiled program, which
  also counts the iteration."""
  from l2w_jax.data import augment  # pylint: disable=g-import-not-at-top
  learner, state, _, labels = _setup()
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  pixels = np.asarray(jax.random.randint(
      jax.random.PRNGKey(5), (NUM_DEVICES * PER_DEVICE,) + TINY_IMAGE, 0,
      256), np.uint8)
  floats = augment.to_float_normalized(pixels, mean, std).numpy()
  mesh = parallel.make_mesh(NUM_DEVICES)
  placed = []
  real_global_array = parallel.global_array
  monkeypatch.setattr(parallel, 'global_array', lambda a, m: placed.append(
      a.shape) or real_global_array(a, m))
  iteration = step_lib.make_iteration('l2w', learner, mesh,
                                      input_norm=(mean, std))
  results = []
  for images in (pixels, floats, pixels):
    results.append(iteration(
        jax.device_put(_copy(state), parallel.replicated(mesh)), images,
        labels, LR, META_LR, True))
  assert placed == [pixels.shape, labels.shape] * 3
  program = iteration.programs['l2w']
  assert program._cache_size() == 2  # uint8 and float32 inputs
  chex.assert_trees_all_equal(results[0], results[1])
  assert int(results[0][0].step) == 1
  # Batches already on the devices (the prefetcher's) are not placed again.
  placed.clear()
  batch = next(parallel.prefetch_to_mesh(iter([{'image': pixels,
                                                'label': labels}]), mesh))
  placed.clear()
  again = iteration(jax.device_put(_copy(state), parallel.replicated(mesh)),
                    batch['image'], batch['label'], LR, META_LR, True)
  assert not placed and program._cache_size() == 2
  chex.assert_trees_all_equal(again, results[0])
  # The program itself counts the iteration (no second dispatch for it).
  counted, _ = program(jax.device_put(_copy(state), parallel.replicated(mesh)),
                       batch['image'], batch['label'], LR, META_LR, True)
  assert int(counted.step) == int(state.step) + 1
  # The two halves share one traced half step (a scan of two). It stays a
  # loop with the explicit convolution rules (MSDNet's on CPU); with JAX's
  # own, which XLA:CPU runs far slower in a loop's body, it is unrolled.
  assert not step_lib.unroll_halves(mesh, learner.model)
  lax_config = tiny_config()
  lax_config.model.conv_gradients = 'lax'
  assert step_lib.unroll_halves(mesh, build_learner(lax_config).model)
  traced = []
  half_step = registry.get('l2w').steps[0].half_step
  counting = step_lib.iteration_program(
      dataclasses.replace(registry.get('l2w').steps[0],
                          half_step=lambda *a: traced.append(1) or half_step(
                              *a)),
      step_lib.data_parallel_learner(learner), mesh, True, (mean, std))
  text = counting.lower(state, batch['image'], batch['label'], LR, META_LR,
                        True).as_text()
  assert len(traced) == 1
  assert 'stablehlo.while' in text


@pytest.mark.parametrize('rule', ['device0', 'mean'])
def test_running_statistics_rule_of_a_sharded_half_step(float64, rule):
  del float64
  learner, state, images, labels = _setup(dtype=jnp.float64)
  mesh = parallel.make_mesh(NUM_DEVICES)
  half_step = step_lib.sharded_half_step(
      l2w.l2w_half_step, step_lib.data_parallel_learner(learner, rule), mesh)
  (x1, y1), (x2, y2) = _device_halves(images, labels)
  arrays = [parallel.global_array(a, mesh) for a in (x1, y1, x2, y2)]
  new, metrics = half_step(_copy(state), *arrays, LR, META_LR,
                           with_meta=False)

  @jax.jit
  def moved_stats(x, y):
    return l2w.train_forward(learner, state, x, y)[3]

  per_device = [moved_stats(*s[0]) for s in _device_shards(images, labels)]
  expected = per_device[0] if rule == 'device0' else _mean(per_device)
  chex.assert_trees_all_close(new.batch_stats, expected, rtol=1e-12,
                              atol=1e-14)
  assert metrics['correct'].shape == (3,) and int(metrics['num_images']) == 16


def _reordered(images, labels):
  """The global batch ordered so that its first half is the union of the
  devices' first halves: then the single-device split equals the sharded."""
  shards = _device_shards(images, labels)
  x = np.concatenate([s[0][0] for s in shards] + [s[1][0] for s in shards])
  y = np.concatenate([s[0][1] for s in shards] + [s[1][1] for s in shards])
  return x, y


def test_sync_bn_parallel_step_equals_the_whole_batch_on_one_device(float64):
  """With global batch statistics, gradients averaged over equal shards are
  the whole-batch gradient (L2W without a meta step: its 'col' weights are
  per sample, so the halves' shards weigh as in the whole batch)."""
  del float64
  learner, state, images, labels = _setup(sync_bn=True, dtype=jnp.float64)
  plain, *_ = _setup(sync_bn=False, dtype=jnp.float64)
  mesh, one_device = parallel.make_mesh(NUM_DEVICES), parallel.make_mesh(1)
  sharded, _ = step_lib.make_iteration('l2w', learner, mesh)(
      jax.device_put(_copy(state), parallel.replicated(mesh)), images, labels,
      LR, META_LR, False)
  single, _ = step_lib.make_iteration('l2w', plain, one_device)(
      jax.device_put(state, parallel.replicated(one_device)),
      *_reordered(images, labels), LR, META_LR, False)
  chex.assert_trees_all_close(sharded, single, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------
# Collectives of the compiled step.

_COLLECTIVE = re.compile(
    r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s*'
    r'(?P<op>all-reduce|all-gather|all-to-all|collective-permute|'
    r'reduce-scatter)(?:-start)?\(', re.M)
_SHAPE = re.compile(r'\b(?:pred|[suf]\d+|bf16)\[(?P<dims>[\d,]*)\]')


def _collectives(hlo: str) -> dict[str, list[int]]:
  """Compiled HLO text -> {op: [elements reduced/gathered by each]}."""
  found = {}
  for m in _COLLECTIVE.finditer(hlo):
    result_type = re.sub(r'\{[^{}]*\}|/\*.*?\*/', '', m['type'])
    elements = sum(math.prod(int(d) for d in s['dims'].split(',') if d)
                   for s in _SHAPE.finditer(result_type))
    found.setdefault(m['op'], []).append(elements)
  return found


def _size(tree) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.long
@pytest.mark.parametrize('with_meta', [True, False])
def test_sharded_step_collectives_do_not_scale_with_the_batch(with_meta):
  """Per half step: each network's gradient all-reduced once, the running
  statistics once, a few metric scalars; nothing gathered, nothing that grows
  with the batch."""
  totals = []
  for per_device in (4, 8):
    learner, state, images, labels = _setup(per_device=per_device)
    mesh = parallel.make_mesh(NUM_DEVICES)
    half_step = step_lib.sharded_half_step(
        l2w.l2w_half_step, step_lib.data_parallel_learner(learner), mesh)
    (x1, y1), (x2, y2) = _device_halves(images, labels)
    arrays = [parallel.global_array(a, mesh) for a in (x1, y1, x2, y2)]
    hlo = half_step.lower(state, *arrays, LR, META_LR,
                          with_meta=with_meta).compile().as_text()
    found = _collectives(hlo)
    assert set(found) == {'all-reduce'}, {k: len(v) for k, v in found.items()}
    totals.append(sum(found['all-reduce']))
  num_exits = 3
  gradients = _size(state.params) + (_size(state.meta_params) if with_meta
                                     else 0)
  # losses, weights, hits, ..., and the weights' five moments per exit
  # (`step.weight_moments`).
  metrics = 3 * num_exits + 2 + int(with_meta) + 5 * num_exits
  assert totals[0] == totals[1]
  assert (gradients + _size(state.batch_stats) <= totals[0] <=
          gradients + _size(state.batch_stats) + metrics)


# ----------------------------------------------------------------------------
# Evaluation, the training program, bad layouts.


def test_sharded_budgeted_evaluation_equals_one_device(tmp_path):
  config = tiny_train_config('sklearn_digits')
  config.dataset.data_dir = str(tmp_path / 'data')
  config.eval.batch_size = 64  # a multiple of 8 devices
  learner = build_learner(config)
  info = data.data_info(config)
  state = init_train_state(learner, jax.random.PRNGKey(3), info.image_shape)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  one = report.evaluate_model(config, learner.model, variables, info)
  mesh = parallel.make_mesh(NUM_DEVICES)
  spec = data.input_spec(config)
  for input_norm in (None, (spec.mean, spec.std)):  # float32, then uint8
    statistics = report.jitted_statistics(learner.model, mesh, input_norm)
    assert statistics.as_bytes == (input_norm is not None)
    sharded = report.evaluate_model(config, learner.model, jax.device_put(
        variables, parallel.replicated(mesh)), info, statistics)
    assert sharded == one
  assert one['num_test'] == 360 and len(one['budgeted']) == 39


@pytest.mark.parametrize('devices,batch,per_device,message', [
    (8, 20, 0, 'train.batch_size=20 does not divide into the 8 devices'),
    (8, 8, 0, 'per-device batch 1 .* cannot be split into two non-empty'),
    (4, 16, 2, 'train.batch_size=16 contradicts train.per_device_batch_size'),
    (4, 0, 0, 'train.batch_size: must be an integer > 0'),
])
def test_impossible_batch_layouts_are_named(tmp_path, devices, batch,
                                            per_device, message):
  config = tiny_train_config('sklearn_digits')
  config.dataset.data_dir = str(tmp_path / 'data')
  config.distributed.num_devices = devices
  config.train.batch_size = batch
  config.train.per_device_batch_size = per_device
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _command(workdir, overrides, script: str | None = None) -> list[str]:
  """experiments.main's command line; with `script`, Python source run
  instead of `-m experiments.main` (it runs the module itself)."""
  start = ['-m', 'experiments.main'] if script is None else ['-c', script]
  return [sys.executable, *start,
          '--config=tests/tiny_digits_config.py', f'--workdir={workdir}',
          *[f'--config.{k}={v}' for k, v in overrides.items()]]


def _start_two_processes(workdir, overrides,
                         scripts=(None, None)) -> list[subprocess.Popen]:
  """Starts experiments.main as 2 local processes x 8 CPU devices (4 of
  each in the mesh, see below) with a localhost coordinator, stdout and
  stderr in one pipe each; `scripts[i]`: see `_command`."""
  env = subprocess_env()
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={NUM_DEVICES}'
  port = _free_port()
  return [subprocess.Popen(
      _command(workdir, {
          **overrides,
          'distributed.coordinator_address': f'localhost:{port}',
          'distributed.num_processes': 2, 'distributed.process_id': i},
               scripts[i]),
      cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _two_processes(workdir, overrides, terminate_after: str | None = None):
  """Runs `_start_two_processes`; with `terminate_after`, SIGTERMs both
  once process 0 prints it. Returns (processes, [output of each])."""
  processes = _start_two_processes(workdir, overrides)
  try:
    head = ''
    if terminate_after is not None:
      for line in processes[0].stdout:
        head += line
        if terminate_after in line:
          for p in processes:
            p.send_signal(signal.SIGTERM)
          break
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    return processes, [head + outputs[0], outputs[1]]
  finally:
    for p in processes:
      p.kill()


# Process 1 of a run: experiments.main, but once checkpoint STEP has been
# handed to orbax (its files are being written in the background), the
# process kills itself, as a host lost in the middle of a save.
_DIE_DURING_SAVE = """
import os, runpy, signal, sys
from l2w_jax.training import checkpoint
save = checkpoint.Checkpointer.save
def save_then_die(self, step, state, meta):
  save(self, step, state, meta)
  if step == STEP:
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
sys.argv[0] = 'experiments.main'
runpy.run_module('experiments.main', run_name='__main__', alter_sys=True)
"""


def _training_rows(workdir) -> list[dict]:
  """The training rows of a run's metrics.jsonl, without wall-clock rates;
  of a step logged twice (by a run that died before saving it, then by the
  rerun), the rerun's."""
  rows = [json.loads(line) for line in
          (workdir / 'metrics.jsonl').read_text().splitlines()]
  by_step = {r['step']: {k: v for k, v in r.items()
                         if k != 'train/images_per_second'}
             for r in rows if 'train/loss' in r}
  return [by_step[step] for step in sorted(by_step)]


@pytest.mark.long
def test_two_processes_train_like_one_process_on_the_same_mesh(tmp_path):
  """2 local processes with a localhost coordinator train 8 L2W iterations
  of digits on a mesh of 8 devices (4 of each process); only process 0
  writes results. The run is stopped twice and resumed each time:

  * a SIGTERM stops both processes after the same iteration, saved
    together (exit 0);
  * process 1 dies (SIGKILL) while a checkpoint is being written: process
    0 stops within 60 s (JAX's heartbeat timeout, 30 s by default) with
    one line naming the lost process and the commands to rerun, no
    traceback and no C++ report; the checkpoint being written does not
    count, the one before it is complete.

  The last rerun resumes from that one and finishes, and the run is the
  same run, bit for bit, as an uninterrupted 1 process x 8 devices: every
  iteration's logged metrics, the final parameters and the evaluation
  (which each process does on its own rows).

  Bit for bit needs two things that only change rounding:
  * distributed.reduction=ordered: XLA's all-reduce sums in an order that
    depends on the process layout and the collective library (gloo across
    processes), and the meta step's confidence ranking turns such rounding
    into different allocations within a few iterations (with the default
    all-reduce the two layouts' momentum was 4e-5 apart after iteration 1
    and 0.13 after iteration 2, measured on an AMD EPYC);
  * the same number of local CPU devices (8) in both layouts: XLA:CPU
    partitions some loops into as many parallel tasks as the process has
    devices, and the partitions round differently.
  """
  num_steps = 8
  overrides = {'dataset.data_dir': tmp_path / 'data',
               'train.num_steps': num_steps, 'train.batch_size': -1,
               'train.per_device_batch_size': 4, 'train.lr': 0.1,
               'meta.lr': 1e-3,
               'eval.batch_size': 250,  # rounded up to 256 for 8 devices
               'train.checkpoint_every_steps': 1,
               'train.keep_checkpoints': num_steps,
               'distributed.num_devices': NUM_DEVICES,
               'distributed.reduction': 'ordered'}
  config = tiny_train_config('sklearn_digits')
  config.dataset.data_dir = str(tmp_path / 'data')
  data.data_info(config)  # prepared once, before the processes share it
  workdir = tmp_path / 'two'
  checkpoints = workdir / 'checkpoints'
  # SIGTERM reaches both processes after iteration 1: they agree on an
  # iteration, save it together and stop.
  stopped = _two_processes(workdir, overrides, terminate_after='step 1/')
  assert [p.returncode for p in stopped[0]] == [0, 0], stopped[1]
  interrupted = [int(m) for m in re.findall(
      r'interrupted: checkpoint saved at iteration (\d+)', stopped[1][0])]
  assert len(interrupted) == 1 and 1 <= interrupted[0] < num_steps - 2, (
      stopped[1])
  assert f'interrupted: checkpoint saved at iteration {interrupted[0]}' in (
      stopped[1][1])
  assert not (workdir / train.RESULTS_FILE).exists()

  # The rerun resumes; process 1 dies while checkpoint `dies_at` is written.
  dies_at = interrupted[0] + 2
  processes = _start_two_processes(
      workdir, overrides,
      scripts=(None, _DIE_DURING_SAVE.replace('STEP', str(dies_at))))
  try:
    assert processes[1].wait(timeout=600) == -signal.SIGKILL
    died = time.monotonic()
    output = processes[0].communicate(timeout=600)[0]
    stopped_after = time.monotonic() - died
  finally:
    for p in processes:
      p.kill()
  print(f'process 0 stopped {stopped_after:.1f} s after process 1 died')
  assert f'resumed from {checkpoints} at iteration {interrupted[0]}' in output
  assert processes[0].returncode != 0, output
  assert stopped_after <= 60, output
  lost = [line for line in output.splitlines() if 'error: lost' in line]
  assert lost == [
      'error: lost a process of this run (process 1 stopped sending '
      'heartbeats); the checkpoints already saved are intact (one being '
      'written counts only once complete): once every host is up, rerun '
      f'the same 2 commands to resume from the newest complete checkpoint '
      f'in {checkpoints}'], output
  for noise in ('Traceback', 'Check failure', 'coordination_service',
                'Terminating process'):
    assert noise not in output, output
  checkpointer = Checkpointer(str(checkpoints))
  saved = checkpointer.all_steps()
  checkpointer.close()
  assert dies_at not in saved and dies_at - 1 in saved, saved

  processes, outputs = _two_processes(workdir, overrides)
  assert f'resumed from {checkpoints} at iteration {dies_at - 1}' in (
      outputs[0])
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert '8 devices on 2 process(es): per-device batch 4' in outputs[0]
  assert 'test top-1 per exit' in outputs[0]
  assert 'test top-1 per exit' not in outputs[1]  # only process 0 reports
  results = json.loads((workdir / train.RESULTS_FILE).read_text())
  assert results['num_test'] == 360 and len(results['budgeted']) == 39
  assert (results['num_processes'], results['num_devices'],
          results['per_device_batch'], results['global_batch'],
          results['iterations']) == (2, 8, 4, 32, num_steps)
  assert len(list(tmp_path.rglob(train.RESULTS_FILE))) == 1
  rows = _training_rows(workdir)
  assert [r['step'] for r in rows] == list(range(1, num_steps + 1))

  one = tmp_path / 'one'
  env = subprocess_env()
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={NUM_DEVICES}'
  run = subprocess.run(_command(one, overrides), cwd=PROJECT_ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr
  assert '8 devices on 1 process(es): per-device batch 4' in run.stdout
  alone = json.loads((one / train.RESULTS_FILE).read_text())
  assert _training_rows(one) == rows
  for key in ('params_sha256', 'anytime', 'budgeted', 'num_test',
              'num_threshold_samples'):
    assert alone[key] == results[key], key
  # The parameters moved: the comparison is not between two initial states.
  initial = init_train_state(build_learner(config),
                             jax.random.PRNGKey(config.seed), (32, 32, 3))
  final = restore_state(config, checkpoints)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 final.params, initial.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-2


def test_ordered_reduction_is_the_mean_in_device_order():
  """distributed.reduction=ordered: every device gets the device-order sum
  of the 8 values divided by 8 (numpy's float32 sequential sum), and it
  agrees with XLA's all-reduce to rounding."""
  mesh = parallel.make_mesh(NUM_DEVICES)
  values = np.array(jax.random.normal(jax.random.PRNGKey(0),
                                       (NUM_DEVICES, 3, 5)), np.float32)
  values[:, 0, 0] = [1e8, 1, -1e8, 1, 1, 1, 1, 1]  # order-sensitive

  def program(reduction):
    mean = parallel.pmean(reduction=reduction)
    return jax.jit(jax.shard_map(lambda x: mean({'v': x[0]})['v'][None],
                                 mesh=mesh, in_specs=P(parallel.DATA_AXIS),
                                 out_specs=P(parallel.DATA_AXIS)))

  def run(reduction):
    return np.asarray(program(reduction)(values))

  # No collective arithmetic: whatever order a layout's all-reduce sums in.
  found = _collectives(program('ordered').lower(values).compile().as_text())
  assert set(found) == {'all-gather'}, found
  ordered = run('ordered')
  expected = values[0].copy()
  for v in values[1:]:
    expected = expected + v
  expected = expected / np.float32(NUM_DEVICES)
  for device in range(NUM_DEVICES):
    np.testing.assert_array_equal(ordered[device], expected)
  # In float32 (1e8 + 1) - 1e8 = 0 (the 1 is below 1e8's ulp), + 5 ones.
  assert ordered[0, 0, 0] == np.float32(5 / 8)
  np.testing.assert_allclose(run('all_reduce')[:, 1:], ordered[:, 1:],
                             rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='distributed.reduction: unknown'):
    parallel.pmean(reduction='tree')
