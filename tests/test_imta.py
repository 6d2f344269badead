"""IMTA as a two-stage training method: each stage's loss and update against
a hand computation, what each stage freezes, its FLOPs, its errors, the
sharded stage-2 step, and a run through both stages."""

import dataclasses
import functools
import importlib
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2w_jax.evaluation.cascade import Cascade
from l2w_jax.evaluation.flops import count_per_exit
from l2w_jax.methods import imta, l2w, l2w_imta
from l2w_jax.models.msdnet import MSDNet
from l2w_jax.optim import sgd_momentum
from l2w_jax.training import train
from l2w_jax.training.learner import build_learner, init_train_state
from tests.tiny import (TINY_IMAGE, float64_step_setup, mean_tree,
                        restore_state, sharded_and_per_device, tiny_config,
                        tiny_train_config)

LR = 0.3
T, GAMMA = 2.0, 0.25


def _setup(method='imta'):
  config = tiny_config()
  config.method = method
  config.imta.temperature = T
  config.imta.gamma = GAMMA
  return float64_step_setup(config)


def _step(learner, state, images, labels, part):
  return jax.jit(functools.partial(imta.imta_step, learner, part=part))(
      state, images, labels, LR)


def _sgd(params, grads, momentum):
  """torch SGD from a momentum buffer: p - lr (0.9 m + g + wd p)."""
  return jax.tree_util.tree_map(
      lambda p, g, m: p - LR * (0.9 * m + g + 1e-4 * p), params, grads,
      momentum)


def _assert_frozen(new, old, part: str) -> None:
  """`part`'s parameters and SGD momentum are exactly as they were."""
  chex.assert_trees_all_equal(new.params[part], old.params[part])
  chex.assert_trees_all_equal(sgd_momentum(new.opt_state)[part],
                              sgd_momentum(old.opt_state)[part])


def _ce(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                  labels))


def test_stage1_trains_the_gradient_equilibrium_msdnet_on_summed_ce(float64):
  del float64
  learner, state, images, labels = _setup()
  new, metrics = _step(learner, state, images, labels, 'stage1')
  backbone = MSDNet(learner.model.cfg)
  assert backbone.cfg.gradient_equilibrium

  def summed_ce(params):
    logits, _ = backbone.apply(
        {'params': params, 'batch_stats': state.batch_stats['net']}, images,
        train=True, mutable=['batch_stats'])
    return sum(_ce(z, labels) for z in logits)

  loss, grads = jax.value_and_grad(summed_ce)(state.params['net'])
  assert float(metrics['train_loss']) == pytest.approx(float(loss), rel=1e-12)
  chex.assert_trees_all_close(
      new.params['net'], _sgd(state.params['net'], grads,
                              sgd_momentum(state.opt_state)['net']),
      rtol=1e-10, atol=1e-13)
  # The heads neither ran nor changed.
  _assert_frozen(new, state, 'heads')
  chex.assert_trees_all_equal(new.batch_stats['heads'],
                              state.batch_stats['heads'])
  np.testing.assert_array_equal(metrics['weight_per_exit'], [1, 1, 1])


def test_stage2_distils_into_the_heads_on_the_frozen_network(float64):
  del float64
  learner, state, images, labels = _setup()
  new, metrics = _step(learner, state, images, labels, 'stage2')
  backbone = MSDNet(learner.model.cfg)
  (pooled, old_logits), moved = backbone.apply(
      {'params': state.params['net'], 'batch_stats': state.batch_stats['net']},
      images, True, method=MSDNet.exit_features, mutable=['batch_stats'])
  heads = imta.IMTAHeads(imta.pooled_feature_dims(backbone.cfg), 5)

  def loss_of(head_params):
    logits, _ = heads.apply(
        {'params': head_params, 'batch_stats': state.batch_stats['heads']},
        pooled, True, mutable=['batch_stats'])
    # By hand: CE of the last head; (1 - g) CE + g T^2 KL for the others.
    teacher = jax.nn.softmax(old_logits[-1] / T)
    loss = _ce(logits[-1], labels)
    for z in logits[:-1]:
      kl = jnp.mean(teacher * (jnp.log(teacher) -
                               jax.nn.log_softmax(z / T)))
      loss += (1 - GAMMA) * _ce(z, labels) + GAMMA * T * T * kl
    return loss

  loss, grads = jax.value_and_grad(loss_of)(state.params['heads'])
  assert float(metrics['train_loss']) == pytest.approx(float(loss), rel=1e-12)
  chex.assert_trees_all_close(
      new.params['heads'], _sgd(state.params['heads'], grads,
                                sgd_momentum(state.opt_state)['heads']),
      rtol=1e-10, atol=1e-13)
  # The network is frozen, but its BatchNorm ran in train mode.
  _assert_frozen(new, state, 'net')
  chex.assert_trees_all_close(new.batch_stats['net'], moved['batch_stats'],
                              rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(metrics['weight_per_exit'], [0.75, 0.75, 1.0])
  # In eval mode the network predicts with the heads.
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  pooled, _ = backbone.apply(
      {'params': state.params['net'], 'batch_stats': state.batch_stats['net']},
      images, False, method=MSDNet.exit_features)
  chex.assert_trees_all_close(
      learner.model.apply(variables, images),
      heads.apply({'params': state.params['heads'],
                   'batch_stats': state.batch_stats['heads']}, pooled, False),
      rtol=1e-12, atol=1e-14)


def test_imta_flops_add_the_heads_and_isc_to_each_exit():
  config = tiny_config()
  config.method = 'imta'
  model = build_learner(config).model
  ops, params = count_per_exit(model, TINY_IMAGE)
  base_ops, base_params = count_per_exit(MSDNet(model.cfg), TINY_IMAGE)
  dims, classes = imta.pooled_feature_dims(model.cfg), 5
  assert len(ops) == len(params) == 3
  extra = 0
  for k, d in enumerate(dims):
    if k > 0:  # ISC k-1: Linear(C -> D_k) and a ReLU over D_k
      extra += classes * d + d + d
    extra += (d if k == 0 else 2 * d) * classes + classes  # head k
    assert ops[k] - base_ops[k] == extra, k
  assert params[-1] > base_params[-1]


@pytest.mark.parametrize('field,value,message', [
    ('temperature', 0.0, 'imta.temperature: .* must be > 0'),
    ('gamma', 1.5, r'imta.gamma: .* in \[0, 1\]'),
    ('gamma', -0.1, r'imta.gamma: .* in \[0, 1\]'),
])
def test_bad_distillation_settings_stop_before_training(tmp_path, field,
                                                        value, message):
  config = tiny_train_config('sklearn_digits', method='imta')
  config.dataset.data_dir = str(tmp_path / 'data')
  setattr(config.imta, field, value)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_sharded_stage2_step_equals_each_device_then_averaged(float64):
  del float64
  learner, state, _, _ = _setup()
  sharded, metrics, alone = sharded_and_per_device(
      'imta', learner, state, lambda s, x, y: _step(learner, s, x, y,
                                                    'stage2'),
      phase='stage2')
  chex.assert_trees_all_close(
      (sharded.params, sharded.opt_state),
      mean_tree([(s.params, s.opt_state) for s in alone]),
      rtol=1e-9, atol=1e-12)
  # Running statistics: device 0's (DDP's buffer broadcast).
  chex.assert_trees_all_close(sharded.batch_stats, alone[0].batch_stats,
                              rtol=1e-12, atol=1e-14)
  assert int(metrics['num_images']) == 32


def test_two_stage_run_keeps_the_stage1_network_and_evaluates_the_heads(
    tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=4, method='imta')
  config.dataset.data_dir = str(tmp_path / 'data')
  config.train.keep_checkpoints = 5
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['phases'] == [{'name': 'stage1', 'start': 0, 'length': 2},
                               {'name': 'stage2', 'start': 2, 'length': 2}]
  checkpoints = tmp_path / 'run' / 'checkpoints'
  # Checkpoints every 100 iterations, but the end of stage 1 is kept.
  stage1, final = (restore_state(config, checkpoints, s) for s in (2, 4))
  learner = build_learner(config)
  initial = init_train_state(learner, jax.random.PRNGKey(config.seed),
                             (32, 32, 3))
  chex.assert_trees_all_equal(stage1.params['heads'], initial.params['heads'])
  chex.assert_trees_all_equal(final.params['net'], stage1.params['net'])
  assert not np.array_equal(
      jax.tree_util.tree_leaves(final.params['heads'])[0],
      jax.tree_util.tree_leaves(stage1.params['heads'])[0])
  # Evaluation runs the IMTA network (heads and ISC in its FLOPs).
  flops, _ = count_per_exit(learner.model, (32, 32, 3))
  assert results['mflops_per_exit'] == [f / 1e6 for f in flops]
  with pytest.raises(ValueError, match='is not one .*; use '
                     '--mode=budgeted'):
    Cascade(learner.model, {}, np.zeros(3), 16)

  # Stage 2 alone, from the network this run trained.
  config.train.start_phase = 1
  config.train.init_from = str(tmp_path / 'run')
  config.train.num_steps = 2
  again = train.train_and_evaluate(config, str(tmp_path / 'stage2'))
  assert again['phases'] == [{'name': 'stage2', 'start': 0, 'length': 2}]
  second = restore_state(config, tmp_path / 'stage2' / 'checkpoints')
  chex.assert_trees_all_equal(second.params['net'], final.params['net'])
  assert not np.array_equal(
      jax.tree_util.tree_leaves(second.params['heads'])[0],
      jax.tree_util.tree_leaves(initial.params['heads'])[0])
  config.train.init_from = str(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match='train.init_from: no '
                     'checkpoint in'):
    train.train_and_evaluate(config, str(tmp_path / 'stage2b'))


@pytest.mark.parametrize('start,init_from,message', [
    (1, None, 'set train.init_from'),
    (2, '/tmp', r"train.start_phase: imta has phases \('stage1', 'stage2'\)"),
    (-1, None, 'train.start_phase'),
])
def test_impossible_starts_are_named_before_training(tmp_path, start,
                                                     init_from, message):
  config = tiny_train_config('sklearn_digits', method='imta')
  config.dataset.data_dir = str(tmp_path / 'data')
  config.train.start_phase = start
  config.train.init_from = init_from
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('name,method', [('imta_imagenet', 'imta'),
                                         ('l2w_imta_imagenet', 'l2w_imta')])
def test_paper_config_of_imta_builds(name, method):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.method == method
  assert (config.meta.interval, config.meta.epsilon) == (100, 0.3)
  learner = build_learner(config)
  assert isinstance(learner.model, imta.IMTANetwork)
  options = dict(learner.method_options)
  assert {k: options.pop(k) for k in ('temperature', 'gamma')} == {
      'temperature': 1.0, 'gamma': 0.1}
  if method == 'l2w_imta':  # L2W-DEN's settings and its weight net too
    assert options.pop(l2w.OPTION).epsilon == pytest.approx(0.3)
    assert learner.weight_net is not None and learner.meta_tx is not None
  else:  # a method without a meta step carries no weight net
    assert learner.weight_net is None and learner.meta_tx is None
  assert not options
  assert dataclasses.asdict(learner.model.cfg)['gradient_equilibrium']
  # The heads' input widths the original hard-codes for step 4.
  assert imta.pooled_feature_dims(learner.model.cfg) == (384, 384, 352, 304,
                                                         560)


def test_l2w_imta_stage1_is_the_l2w_half_step_on_the_network(float64):
  """L2W + IMTA, stage 1: L2W-DEN's half step on the gradient-equilibrium
  MSDNet alone gives the network's new parameters, statistics, momentum and
  weight net; the heads stay as they were."""
  del float64
  learner, state, images, labels = _setup('l2w_imta')
  x1, y1, x2, y2 = images[:4], labels[:4], images[4:], labels[4:]
  new, metrics = jax.jit(functools.partial(
      l2w_imta.l2w_stage1_half_step, learner), static_argnames='with_meta')(
          state, x1, y1, x2, y2, LR, 1e-2, with_meta=True)
  # The same half step on a plain L2W learner whose backbone is the GE MSDNet.
  plain_config = tiny_config()
  plain = build_learner(plain_config)
  plain = dataclasses.replace(plain, model=MSDNet(dataclasses.replace(
      plain.model.cfg, gradient_equilibrium=True)))
  alone = init_train_state(plain, jax.random.PRNGKey(0), TINY_IMAGE,
                           jnp.float64)
  alone = alone.replace(
      params=state.params['net'], batch_stats=state.batch_stats['net'],
      opt_state=plain.tx.update(
          jax.tree_util.tree_map(jnp.ones_like, state.params['net']),
          plain.tx.init(state.params['net']), state.params['net'])[1],
      meta_params=state.meta_params, meta_opt_state=state.meta_opt_state)
  expected, expected_metrics = jax.jit(functools.partial(
      l2w.l2w_half_step, plain), static_argnames='with_meta')(
          alone, x1, y1, x2, y2, LR, 1e-2, with_meta=True)
  chex.assert_trees_all_close(
      (new.params['net'], new.batch_stats['net'],
       sgd_momentum(new.opt_state)['net'], new.meta_params,
       new.meta_opt_state),
      (expected.params, expected.batch_stats,
       sgd_momentum(expected.opt_state), expected.meta_params,
       expected.meta_opt_state), rtol=1e-12, atol=1e-14)
  assert float(metrics['meta_loss']) == pytest.approx(
      float(expected_metrics['meta_loss']), rel=1e-12)
  chex.assert_trees_all_equal(
      (new.params['heads'], new.batch_stats['heads'],
       sgd_momentum(new.opt_state)['heads']),
      (state.params['heads'], state.batch_stats['heads'],
       sgd_momentum(state.opt_state)['heads']))


def test_l2w_imta_run_meta_learns_in_stage1_then_distils(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=4,
                             method='l2w_imta')
  config.dataset.data_dir = str(tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert [p['name'] for p in results['phases']] == ['stage1', 'stage2']
  rows = [json.loads(l) for l in
          (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  rows = {r['step']: r for r in rows if 'train/loss' in r}
  assert [('train/meta_loss' in rows[s]) for s in (1, 2, 3, 4)] == [
      True, True, False, False]
  assert [rows[s]['train/phase'] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  assert len(results['budgeted']) == 39
