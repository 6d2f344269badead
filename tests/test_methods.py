"""Training methods other than L2W: gradient equilibrium, BoostNet, and the
registry that plugs them into the (sharded) training loop."""

import dataclasses
import functools
import importlib
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax import optim
from l2w_jax import parallel
from l2w_jax.meta import weighting
from l2w_jax.methods import boostnet
from l2w_jax.methods import imta
from l2w_jax.models import gradient_equilibrium as ge
from l2w_jax.models.ensemble import ensemble_logits
from l2w_jax.models.msdnet import MSDNet
from l2w_jax.training import config_checks
from l2w_jax.training import registry
from l2w_jax.training import step as step_lib
from l2w_jax.training import train
from l2w_jax.training.learner import build_learner, init_train_state
from tests.tiny import (TINY_IMAGE, TINY_MSDNET,
                        check_cascade_against_simulated, restore_state,
                        tiny_config, tiny_train_config)

NUM_DEVICES = 8


# ----------------------------------------------------------------------------
# Gradient equilibrium.


def test_scale_gradient_is_an_identity_with_a_scaled_backward():
  x = jnp.array([1.5, -2.0, 3.25])
  np.testing.assert_array_equal(ge.scale_gradient(x, 0.25), x)
  grad = jax.grad(lambda v: jnp.sum(ge.scale_gradient(v, 0.25) * v))(x)
  # d/dv [s(v) * v] = 0.25 * v (through the rescale) + v (direct).
  np.testing.assert_allclose(grad, 1.25 * x, rtol=0, atol=0)


@pytest.mark.parametrize('block,num_blocks', [(0, 4), (1, 4), (2, 4), (3, 4)])
def test_two_rescales_of_one_block_on_a_toy_graph(block, num_blocks):
  """h -> a = s(h, 1/(K-i)) -> classifier loss c*a; b = s(a, K-i-1) ->
  later loss d*b: dL/dh = (c + (K-i-1) d) / (K-i); the classifier side
  itself is unscaled."""
  c, d = 0.7, -1.3

  def loss(h, weight):
    a = ge.scale_gradient(h, ge.classifier_scale(block, num_blocks))
    b = ge.scale_gradient(a, ge.onward_scale(block, num_blocks))
    return weight * c * a + d * b

  dh, dw = jax.grad(loss, argnums=(0, 1))(2.0, 1.0)
  k = num_blocks - block
  assert dh == pytest.approx((c + (k - 1) * d) / k, rel=1e-6)
  assert dw == pytest.approx(c * 2.0, rel=1e-6)


def _exit_loss_grads(model, variables, images, labels):
  def total(params):
    logits, _ = model.apply({'params': params,
                             'batch_stats': variables['batch_stats']},
                            images, train=True, mutable=['batch_stats'])
    return jnp.sum(jnp.mean(weighting.per_exit_losses(logits, labels),
                            axis=0))
  return jax.jit(jax.grad(total))(variables['params'])


def test_gradient_equilibrium_rescales_only_the_backbone():
  """On the tiny MSDNet (3 blocks): same forward; every classifier's own
  gradient and the last block's are the plain ones; block 0 receives
  (1/3) of the summed exits' gradient through the coarsest scale and differs."""
  plain = MSDNet(TINY_MSDNET)
  with_ge = MSDNet(dataclasses.replace(TINY_MSDNET, gradient_equilibrium=True))
  images = jax.random.normal(jax.random.PRNGKey(0), (6,) + TINY_IMAGE)
  labels = jnp.arange(6) % 5
  variables = plain.init(jax.random.PRNGKey(1), images, train=False)
  for a, b in zip(plain.apply(variables, images), with_ge.apply(variables,
                                                                images)):
    np.testing.assert_array_equal(a, b)
  g_plain = _exit_loss_grads(plain, variables, images, labels)
  g_ge = _exit_loss_grads(with_ge, variables, images, labels)
  for name in g_plain:
    if name.startswith('classifier') or name.startswith('blocks_2'):
      chex.assert_trees_all_close(g_ge[name], g_plain[name], rtol=1e-5,
                                  atol=1e-7)
  differs = jax.tree_util.tree_map(
      lambda a, b: float(jnp.max(jnp.abs(a - b))), g_ge['blocks_0_0'],
      g_plain['blocks_0_0'])
  assert max(jax.tree_util.tree_leaves(differs)) > 1e-4


# ----------------------------------------------------------------------------
# BoostNet.


def test_reweights_follow_the_original_rule():
  assert boostnet.reweights(0.5, 3) == (0.5, 0.5, 0.5)
  assert boostnet.reweights((0.2, 0.6), 3) == pytest.approx((0.2, 0.4, 0.6))
  assert boostnet.reweights([0.1, 0.2, 0.3], 3) == (0.1, 0.2, 0.3)
  with pytest.raises(ValueError, match='boostnet.reweight'):
    boostnet.reweights((0.1, 0.2, 0.3, 0.4), 3)


def _toy_logits():
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  return [jax.random.normal(k, (4, 5), jnp.float32) for k in keys]


def test_boosted_losses_against_a_hand_computation():
  o = _toy_logits()
  labels = jnp.array([0, 3, 1, 4])
  r = (0.5, 0.25, 0.75)
  p1 = o[0] * r[0]
  p2 = (o[1] + p1) * r[1]
  inputs = [o[0], o[1] + p1, o[2] + p2]

  def ce(z):
    z = np.asarray(z, np.float64)
    log_probs = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    return -np.mean(log_probs[np.arange(4), np.asarray(labels)])

  np.testing.assert_allclose(boostnet.stage_losses(o, labels, r),
                             [ce(z) for z in inputs], rtol=1e-6)
  # Test time: Q_k = o_k + Q_{k-1} r_k (the consumer's r).
  q1 = o[1] + o[0] * r[1]
  q2 = o[2] + q1 * r[2]
  for got, want in zip(ensemble_logits(o, r), [o[0], q1, q2]):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_no_gradient_from_exit_k_reaches_earlier_exit_logits():
  o = _toy_logits()
  labels = jnp.array([0, 3, 1, 4])
  for k in (1, 2):
    grads = jax.grad(lambda o: boostnet.stage_losses(o, labels, (0.5,) * 3)[k])(o)
    for j in range(k):
      assert float(jnp.max(jnp.abs(grads[j]))) == 0.0
    assert float(jnp.max(jnp.abs(grads[k]))) > 1e-3


def test_boostnet_model_predicts_with_the_ensemble_in_eval_mode():
  cfg = dataclasses.replace(TINY_MSDNET, ensemble_reweight=(0.5, 0.5, 0.5))
  boosted, plain = MSDNet(cfg), MSDNet(TINY_MSDNET)
  images = jax.random.normal(jax.random.PRNGKey(0), (2,) + TINY_IMAGE)
  variables = plain.init(jax.random.PRNGKey(1), images, train=False)
  raw = plain.apply(variables, images)
  for got, want in zip(boosted.apply(variables, images),
                       ensemble_logits(raw, cfg.ensemble_reweight)):
    np.testing.assert_array_equal(got, want)
  train_out, _ = boosted.apply(variables, images, train=True,
                               mutable=['batch_stats'])
  train_raw, _ = plain.apply(variables, images, train=True,
                             mutable=['batch_stats'])
  for got, want in zip(train_out, train_raw):  # training sees o_k itself
    np.testing.assert_array_equal(got, want)


def test_boostnet_config_errors_name_the_field():
  config = tiny_config()
  config.method = 'boostnet'
  config.boostnet.reweight = (1.5,)
  with pytest.raises(ValueError, match=r'boostnet.reweight: .*\[0, 1\]'):
    build_learner(config)
  config.boostnet.reweight = (0.1, 0.2, 0.3, 0.4)
  with pytest.raises(ValueError, match='boostnet.reweight'):
    build_learner(config)


def test_method_registry_rejects_ambiguous_registrations():
  with pytest.raises(ValueError, match='exactly one'):
    registry.register('neither', uses_meta_step=False)
  with pytest.raises(ValueError, match='already registered'):
    registry.register('boostnet', batch_step=lambda *a: a,
                     uses_meta_step=False)
  with pytest.raises(ValueError, match='needs a weight_net'):
    registry.register('meta_without_net', lambda *a: a, uses_meta_step=True)
  assert {'l2w', 'uniform', 'boostnet', 'imta', 'l2w_imta', 'regime_disjoint',
          'regime_joint', 'regime_mixed'} <= set(registry.available())


def test_methods_are_found_by_module_and_name():
  with pytest.raises(ValueError, match="method: cannot import 'no_such_module'"):
    registry.get('no_such_module:sdn')
  with pytest.raises(ValueError, match='does not register it'):
    registry.get('l2w_jax.methods.uniform:sdn')
  assert registry.get('l2w_jax.methods.uniform:uniform') is registry.get(
      'uniform')


@pytest.mark.parametrize('method,has_weight_net', [
    ('l2w', True), ('uniform', False), ('boostnet', False)])
def test_only_methods_with_a_meta_step_carry_a_weight_net(method,
                                                           has_weight_net):
  config = tiny_config()
  config.method = method
  learner = build_learner(config)
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE)
  assert (learner.weight_net is not None) == has_weight_net
  assert (state.meta_params is not None) == has_weight_net
  assert (state.meta_opt_state is not None) == has_weight_net
  # The backbone starts the same either way.
  reference = init_train_state(build_learner(tiny_config()),
                               jax.random.PRNGKey(0), TINY_IMAGE)
  if method != 'boostnet':  # BoostNet's backbone has other fields
    chex.assert_trees_all_equal(state.params, reference.params)


def test_sharded_boostnet_step_equals_each_device_then_averaged(float64):
  """8 devices, each its own BN statistics and shard: SGD is linear in the
  gradient, so the sharded update is the mean of the per-device updates
  (running statistics: device 0's)."""
  del float64
  config = tiny_config()
  config.method = 'boostnet'
  learner = build_learner(config)
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE,
                           jnp.float64)
  images = np.asarray(jax.random.normal(
      jax.random.PRNGKey(1), (NUM_DEVICES * 4,) + TINY_IMAGE, jnp.float64))
  labels = np.arange(NUM_DEVICES * 4, dtype=np.int32) % 5
  mesh = parallel.make_mesh(NUM_DEVICES)
  iteration = step_lib.make_iteration('boostnet', learner, mesh)
  sharded, (metrics,) = iteration(
      jax.device_put(jax.tree_util.tree_map(jnp.copy, state),
                     parallel.replicated(mesh)), images, labels, 0.3, 0.0,
      False)
  one = jax.jit(functools.partial(boostnet.boostnet_step, learner))
  alone = [one(state, x, y, 0.3)[0] for x, y in zip(
      np.split(images, NUM_DEVICES), np.split(labels, NUM_DEVICES))]
  mean = jax.tree_util.tree_map(lambda *xs: sum(xs) / len(xs),
                                *[s.replace(batch_stats=None) for s in alone])
  chex.assert_trees_all_close(
      sharded.replace(step=state.step, batch_stats=None), mean,
      rtol=1e-9, atol=1e-12)
  chex.assert_trees_all_close(sharded.batch_stats, alone[0].batch_stats,
                              rtol=1e-12, atol=1e-14)
  assert int(sharded.step) == 1 and int(metrics['num_images']) == 32
  assert metrics['loss_per_exit'].shape == (3,)
  # Hits are those of the boosted predictions Q_k, summed over devices.
  hits = np.zeros(3, np.int64)
  for x, y in zip(np.split(images, NUM_DEVICES), np.split(labels,
                                                           NUM_DEVICES)):
    logits, _ = learner.model.apply(
        {'params': state.params, 'batch_stats': state.batch_stats}, x,
        train=True, mutable=['batch_stats'])
    for k, q in enumerate(ensemble_logits(logits, (0.5,) * 3)):
      hits[k] += int(np.sum(np.argmax(q, axis=-1) == y))
  np.testing.assert_array_equal(metrics['correct'], hits)


def test_boostnet_trains_and_evaluates_with_the_ensemble(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=2, method='boostnet')
  config.dataset.data_dir = str(tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['method'] == 'boostnet' and results['iterations'] == 2
  assert len(results['budgeted']) == 39
  rows = [json.loads(l) for l in
          (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  rows = [r for r in rows if 'train/loss' in r]
  assert [r['step'] for r in rows] == [1, 2]
  for row in rows:  # one whole-batch step per iteration: the summed stages
    assert row['train/loss'] == pytest.approx(
        sum(row[f'train/loss_exit{k}'] for k in (1, 2, 3)), rel=1e-6)
    assert 'train/meta_loss' not in row


@pytest.mark.parametrize('name', ['boostnet_cifar100', 'boostnet_imagenet'])
def test_boostnet_paper_configs_build(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.validate_config(config)
  model = build_learner(config).model
  assert model.cfg.gradient_equilibrium
  assert model.cfg.ensemble_reweight == (0.5,) * config.model.n_blocks
  assert config.train.schedule == 'multistep' and config.train.lr == 0.1


def test_cascade_of_a_boosted_model_predicts_with_the_ensembles():
  """Real early exiting of BoostNet carries Q_k from stage to stage and
  gives what simulated exiting on the ensembles gives."""
  model = MSDNet(dataclasses.replace(TINY_MSDNET,
                                     ensemble_reweight=(0.5, 0.25, 0.75)))
  exits = check_cascade_against_simulated(model)
  assert len(set(exits.tolist())) > 1  # several exits are used


# ----------------------------------------------------------------------------
# IMTA stage 2.


def test_distillation_uses_the_mean_over_batch_and_classes():
  student, teacher = _toy_logits()[:2]
  t = 2.0
  p = np.asarray(jax.nn.softmax(teacher / t, axis=-1), np.float64)
  log_q = np.asarray(jax.nn.log_softmax(student / t, axis=-1), np.float64)
  want = np.mean(p * (np.log(p) - log_q))  # over B*C entries, not batchmean
  assert float(imta.kl_divergence_mean(student, teacher, t)) == pytest.approx(
      want, rel=1e-5)
  labels = jnp.array([0, 3, 1, 4])
  o = _toy_logits()
  ce = [float(boostnet.stage_losses([z], labels, (1.0,))[0]) for z in o]
  kl = [float(imta.kl_divergence_mean(z, teacher, t)) for z in o[:2]]
  gamma = 0.3
  want = ce[2] + sum((1 - gamma) * ce[k] + gamma * t * t * kl[k]
                     for k in (0, 1))
  assert float(imta.distillation_loss(o, teacher, labels, t, gamma)) == (
      pytest.approx(want, rel=1e-5))
  # The teacher is a constant.
  grad = jax.grad(lambda z: imta.distillation_loss(o, z, labels, t, gamma))(
      teacher)
  assert float(jnp.max(jnp.abs(grad))) == 0.0


def test_isc_heads_pass_gradients_back_to_earlier_heads():
  heads = imta.IMTAHeads((6, 6, 6), 5)
  features = [jax.random.normal(jax.random.PRNGKey(k), (4, 6))
              for k in range(3)]
  variables = heads.init(jax.random.PRNGKey(9), features, False)
  params = variables['params']
  assert params['classifier_0']['kernel'].shape == (6, 5)  # no ISC input
  assert params['classifier_2']['kernel'].shape == (12, 5)
  assert set(params) == {'classifier_0', 'classifier_1', 'classifier_2',
                         'isc_modules_0_0', 'isc_modules_0_1',
                         'isc_modules_1_0', 'isc_modules_1_1'}

  def last_exit_loss(params):
    logits, _ = heads.apply({'params': params,
                             'batch_stats': variables['batch_stats']},
                            features, True, mutable=['batch_stats'])
    return jnp.sum(logits[-1] ** 2)

  grads = jax.grad(last_exit_loss)(params)
  # Not detached: the last exit's loss reaches head 0 through two ISCs.
  assert float(jnp.max(jnp.abs(grads['classifier_0']['kernel']))) > 0


def test_loss_equalisation_divides_by_moving_averages(float64):
  """--loss_equal: m_k = L_k at the first step, then 0.9 m_k + 0.1 L_k; the
  loss is sum_k L_k / m_k * mean(m) with m constant, so the SGD step is
  that of sum_k c_k L_k with c_k = mean(m) / m_k."""
  del float64
  config = tiny_config()
  config.method = 'boostnet'
  config.boostnet.loss_equal = True
  learner = build_learner(config)
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE,
                           jnp.float64)
  assert int(state.method_state['updates']) == 0
  images = jax.random.normal(jax.random.PRNGKey(1), (8,) + TINY_IMAGE,
                             jnp.float64)
  labels = jnp.arange(8, dtype=jnp.int32) % 5
  step = jax.jit(functools.partial(boostnet.boostnet_step, learner))
  reweight = learner.model.cfg.ensemble_reweight

  def stage_losses(params, batch_stats):
    logits, _ = learner.model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'])
    return boostnet.stage_losses(logits, labels, reweight)

  averages = None
  for t in range(3):
    losses = np.asarray(stage_losses(state.params, state.batch_stats))
    averages = losses if averages is None else 0.9 * averages + 0.1 * losses
    coefficients = np.mean(averages) / averages
    grads = jax.grad(lambda p, c=coefficients: jnp.sum(
        jnp.asarray(c) * stage_losses(p, state.batch_stats)))(state.params)
    new, metrics = step(state, images, labels, 0.3)
    np.testing.assert_allclose(new.method_state['loss_average'], averages,
                               rtol=1e-12)
    assert int(new.method_state['updates']) == t + 1
    assert float(metrics['train_loss']) == pytest.approx(
        float(np.sum(losses * coefficients)), rel=1e-12)
    np.testing.assert_allclose(metrics['weight_per_exit'], coefficients,
                               rtol=1e-12)
    expected = jax.tree_util.tree_map(
        lambda p, g, m: p - 0.3 * (0.9 * m + g + 1e-4 * p), state.params,
        grads, optim.sgd_momentum(state.opt_state))
    chex.assert_trees_all_close(new.params, expected, rtol=1e-10,
                                atol=1e-13)
    state = new
  assert not np.allclose(coefficients, 1.0)  # the weights do differ


def test_loss_averages_are_checkpointed_and_resume_exactly(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=3, method='boostnet')
  config.dataset.data_dir = str(tmp_path / 'data')
  config.boostnet.loss_equal = True
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  assert train.train_and_evaluate(config, str(tmp_path / 'split'),
                                  interrupt_at_step=1) == {'interrupted_at': 1}
  saved = restore_state(config, tmp_path / 'split' / 'checkpoints')
  assert int(saved.method_state['updates']) == 1
  resumed = train.train_and_evaluate(config, str(tmp_path / 'split'))
  assert resumed['params_sha256'] == whole['params_sha256']
  final = restore_state(config, tmp_path / 'whole' / 'checkpoints')
  assert int(final.method_state['updates']) == 3
