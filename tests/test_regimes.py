"""The training regimes (disjoint, joint, mixed): each phase's loss against a
hand computation, frozen parts that really do not move, the phase plan, and
whole runs that cross the phase boundary and resume there."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2w_jax.methods import regimes
from l2w_jax.optim import sgd_momentum
from l2w_jax.training import registry
from l2w_jax.training import train
from l2w_jax.training.checkpoint import Checkpointer
from l2w_jax.training.learner import build_learner, init_train_state
from tests.tiny import (float64_step_setup, mean_tree, restore_state,
                        sharded_and_per_device, tiny_config,
                        tiny_train_config)

LR = 0.3
NUM_EXITS = 3
BACKBONE = ('blocks_', f'classifier_{NUM_EXITS - 1}')


def _setup(method='regime_disjoint'):
  config = tiny_config()
  config.method = method
  return float64_step_setup(config)


def _cross_entropy(logits, labels):
  return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, labels)))


def _is_backbone(name):
  return name.startswith(BACKBONE)


def _step(learner, state, images, labels, part):
  return jax.jit(functools.partial(regimes.regime_step, learner, part=part))(
      state, images, labels, LR)


def _assert_groups(new, old, frozen):
  """Every top-level module in `frozen` has identical parameters, momentum
  and statistics; every other module's parameters moved."""
  for name in old.params:
    if name in frozen:
      chex.assert_trees_all_equal(new.params[name], old.params[name])
      chex.assert_trees_all_equal(sgd_momentum(new.opt_state)[name],
                                  sgd_momentum(old.opt_state)[name])
      if name in old.batch_stats:
        chex.assert_trees_all_equal(new.batch_stats[name],
                                    old.batch_stats[name])
    else:
      for a, b in zip(jax.tree_util.tree_leaves(new.params[name]),
                      jax.tree_util.tree_leaves(old.params[name]),
                      strict=True):
        assert not np.array_equal(a, b), name


def test_backbone_phase_trains_blocks_and_last_exit_on_its_loss(float64):
  del float64
  learner, state, images, labels = _setup()
  new, metrics = _step(learner, state, images, labels, 'backbone')
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  logits, _ = learner.model.apply(variables, images, train=True,
                                  mutable=['batch_stats'])
  assert float(metrics['train_loss']) == pytest.approx(
      _cross_entropy(logits[-1], labels), rel=1e-12)
  np.testing.assert_array_equal(metrics['weight_per_exit'], [0, 0, 1])
  assert metrics['loss_per_exit'][:2].tolist() == [0.0, 0.0]
  _assert_groups(new, state, frozen={'classifier_0', 'classifier_1'})
  # SGD on CE(last exit) alone: p - lr (0.9 m + g + wd p) for the blocks.
  def last_exit_loss(params):
    out, _ = learner.model.apply({'params': params,
                                  'batch_stats': state.batch_stats}, images,
                                 train=True, mutable=['batch_stats'])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        out[-1], labels))
  grads = jax.grad(last_exit_loss)(state.params)
  expected = jax.tree_util.tree_map(
      lambda p, g, m: p - LR * (0.9 * m + g + 1e-4 * p), state.params, grads,
      sgd_momentum(state.opt_state))
  chex.assert_trees_all_close(new.params['blocks_0_0'],
                              expected['blocks_0_0'], rtol=1e-12, atol=1e-14)


def test_heads_phase_trains_the_other_exits_on_the_frozen_backbone(float64):
  del float64
  learner, state, images, labels = _setup()
  new, metrics = _step(learner, state, images, labels, 'heads')
  frozen = {n for n in state.params if _is_backbone(n)}
  _assert_groups(new, state, frozen=frozen)
  # The frozen last exit is in eval mode and counts in the mean over K.
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  eval_logits = learner.model.apply(variables, images, train=False)
  per_exit = np.asarray(metrics['loss_per_exit'])
  assert per_exit[-1] == pytest.approx(
      _cross_entropy(eval_logits[-1], labels), rel=1e-12)
  assert float(metrics['train_loss']) == pytest.approx(
      per_exit.sum() / NUM_EXITS, rel=1e-12)
  np.testing.assert_allclose(metrics['weight_per_exit'], [1 / 3] * 3)
  # The heads read eval-mode features: other running statistics of the
  # backbone give another loss.
  shifted = state.replace(batch_stats={
      n: jax.tree_util.tree_map(lambda s: s + 0.5, v) if _is_backbone(n) else v
      for n, v in state.batch_stats.items()})
  _, other = _step(learner, shifted, images, labels, 'heads')
  assert abs(float(other['loss_per_exit'][0]) - per_exit[0]) > 1e-3


def test_all_phase_is_the_mean_over_exits_in_train_mode(float64):
  del float64
  learner, state, images, labels = _setup('regime_joint')
  new, metrics = _step(learner, state, images, labels, 'all')
  logits, _ = learner.model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, images,
      train=True, mutable=['batch_stats'])
  expected = [_cross_entropy(z, labels) for z in logits]
  np.testing.assert_allclose(metrics['loss_per_exit'], expected, rtol=1e-12)
  assert float(metrics['train_loss']) == pytest.approx(
      sum(expected) / NUM_EXITS, rel=1e-12)
  _assert_groups(new, state, frozen=set())


def test_phase_plan_splits_the_run_and_names_bad_splits():
  config = tiny_train_config('sklearn_digits', method='regime_mixed')
  plan = registry.phase_plan(config, 10)
  assert [(p.name, p.start, p.length) for p in plan] == [('backbone', 0, 5),
                                                          ('all', 5, 5)]
  assert registry.phase_at(plan, 4).name == 'backbone'
  assert registry.phase_at(plan, 5).name == 'all'
  config.train.phase_split = 0.3
  assert [p.length for p in registry.phase_plan(config, 10)] == [3, 7]
  for split, total in ((0.0, 10), (1.0, 10), (0.5, 1), (0.01, 10)):
    config.train.phase_split = split
    with pytest.raises(ValueError, match='train.phase_split'):
      registry.phase_plan(config, total)
  config.method = 'regime_joint'
  assert [(p.name, p.length) for p in registry.phase_plan(config, 10)] == [
      ('all', 10)]
  config.method = 'l2w'
  assert [(p.name, p.length) for p in registry.phase_plan(config, 10)] == [
      ('l2w', 10)]


def test_sharded_regime_step_equals_each_device_then_averaged(float64):
  """8 devices: the heads phase's update is the mean of the per-device
  updates, and the frozen backbone stays as it was."""
  del float64
  learner, state, _, _ = _setup()
  sharded, metrics, alone = sharded_and_per_device(
      'regime_disjoint', learner, state,
      lambda s, x, y: _step(learner, s, x, y, 'heads'), phase='heads')
  chex.assert_trees_all_close(sharded.opt_state,
                              mean_tree([s.opt_state for s in alone]),
                              rtol=1e-9, atol=1e-12)
  _assert_groups(sharded, state, frozen={n for n in state.params
                                         if _is_backbone(n)})
  assert int(metrics['num_images']) == 32


@pytest.fixture(scope='module')
def disjoint_runs(tmp_path_factory):
  """A 4-iteration disjoint run (2 + 2), checkpointed every iteration, and
  the same run stopped at the phase boundary and resumed."""
  base = tmp_path_factory.mktemp('regimes')
  config = tiny_train_config('sklearn_digits', num_steps=4,
                             method='regime_disjoint')
  config.dataset.data_dir = str(base / 'data')
  config.train.checkpoint_every_steps = 1
  config.train.keep_checkpoints = 5
  whole = train.train_and_evaluate(config, str(base / 'whole'))
  stopped = train.train_and_evaluate(config, str(base / 'split'),
                                     interrupt_at_step=2)
  resumed = train.train_and_evaluate(config, str(base / 'split'))
  return config, base, whole, stopped, resumed


def test_disjoint_run_freezes_each_part_in_its_phase(disjoint_runs):
  config, base, whole, _, _ = disjoint_runs
  assert whole['phases'] == [{'name': 'backbone', 'start': 0, 'length': 2},
                             {'name': 'heads', 'start': 2, 'length': 2}]
  learner = build_learner(config)
  initial = init_train_state(learner, jax.random.PRNGKey(config.seed),
                             (32, 32, 3))
  states = [restore_state(config, base / 'whole' / 'checkpoints', s)
            for s in (1, 2, 3, 4)]
  heads = [n for n in initial.params if not _is_backbone(n)]
  backbone = [n for n in initial.params if _is_backbone(n)]
  for state in states[:2]:  # phase 1: the heads are as initialised
    chex.assert_trees_all_equal({n: state.params[n] for n in heads},
                                {n: initial.params[n] for n in heads})
  for state in states[2:]:  # phase 2: the backbone is as phase 1 left it
    chex.assert_trees_all_equal(
        {n: state.params[n] for n in backbone},
        {n: states[1].params[n] for n in backbone})
    chex.assert_trees_all_equal(
        {n: state.batch_stats[n] for n in backbone},
        {n: states[1].batch_stats[n] for n in backbone})
  # ... and phase 1 did move it.
  assert not np.array_equal(
      jax.tree_util.tree_leaves(states[1].params['blocks_0_0'])[0],
      jax.tree_util.tree_leaves(initial.params['blocks_0_0'])[0])
  # Phase 2 starts from a fresh optimizer: the backbone's momentum is zero.
  for name in backbone:
    for buffer in jax.tree_util.tree_leaves(
        sgd_momentum(states[2].opt_state)[name]):
      assert not np.any(buffer)


def test_disjoint_run_restarts_the_schedule_and_resumes_exactly(
    disjoint_runs):
  config, base, whole, stopped, resumed = disjoint_runs
  rows = [json.loads(l) for l in
          (base / 'whole' / 'metrics.jsonl').read_text().splitlines()]
  rows = {r['step']: r for r in rows if 'train/loss' in r}
  # The cosine over each 2-iteration phase: lr0, lr0 / 2, lr0, lr0 / 2.
  lr0 = config.train.lr
  assert [rows[s]['train/lr'] for s in (1, 2, 3, 4)] == pytest.approx(
      [lr0, lr0 / 2, lr0, lr0 / 2], rel=1e-15)
  assert [rows[s]['train/phase'] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  assert stopped == {'interrupted_at': 2}
  assert resumed['params_sha256'] == whole['params_sha256']
  assert resumed['budgeted'] == whole['budgeted']
  checkpointer = Checkpointer(str(base / 'split' / 'checkpoints'))
  try:
    assert checkpointer.all_steps()[-1] == 4
  finally:
    checkpointer.close()
