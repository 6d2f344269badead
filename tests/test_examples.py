"""The examples run (reduced: a few iterations)."""

import functools
import importlib.util
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax import data
from l2w_jax.evaluation import cascade_report
from l2w_jax.meta import api
from l2w_jax.meta.weighting import NUM_BUDGETS
from l2w_jax.methods import l2w
from l2w_jax.training import train
from l2w_jax.training.forward import backbone_losses, split_halves
from l2w_jax.training.learner import (build_learner, init_train_state,
                                      method_model)
from l2w_jax.training.workdir import restore_variables
from tests.conftest import PROJECT_ROOT
from tests.tiny import TINY_IMAGE, tiny_config, tiny_train_config


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
      name, PROJECT_ROOT / 'examples' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_custom_weight_net_example_trains_with_its_own_pieces(tmp_path):
  example = _load('custom_weight_net')
  summary = example.train(steps=2, data_dir=str(tmp_path / 'data'))
  assert summary['steps'] == 2
  assert len(summary['test_top1_per_exit']) == 4
  assert np.isfinite(summary['meta_loss']) and summary['meta_loss'] > 0
  weights = summary['mean_weight_per_exit']
  # The new net's weights lie in (0, 2) and already differ between exits.
  assert all(0 < w < 2 for w in weights) and len(set(weights)) == 4


def _cascade(config, workdir) -> list:
  """The cascade's rows at budgets 5 and 39 for the run in `workdir`, as
  `experiments.evaluate --mode=cascade` measures them (in this process)."""
  info = data.data_info(config)
  variables, _ = restore_variables(config, str(workdir))
  return cascade_report.measure(config, method_model(config), variables,
                                info, budgets=[5, 39], batch_size=16,
                                latency_images=4)


def test_sdn_coefficients_are_the_originals_schedule():
  """Kaya et al.'s `sdn_train`: C = 0.15 ... 0.9 for six internal
  classifiers, tau = min(C, 0.01 + epoch C / epochs), the last exit 1."""
  from examples import shallow_deep  # pylint: disable=g-import-not-at-top
  largest = shallow_deep.largest_coefficients(7)
  np.testing.assert_allclose(largest, [0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0])
  # 5 iterations per epoch, 10 epochs: iteration 7 is in epoch 2, 49 in 10.
  for step, epoch in ((0, 1), (4, 1), (7, 2), (49, 10)):
    tau = shallow_deep.coefficients(jnp.asarray(step), largest, 5, 10)
    expected = [min(c, 0.01 + epoch * c / 10) for c in largest[:-1]] + [1.0]
    np.testing.assert_allclose(tau, expected, rtol=1e-6)
  # A 4-exit network: three internal classifiers at 0.3, 0.6, 0.9.
  np.testing.assert_allclose(shallow_deep.largest_coefficients(4),
                             [0.3, 0.6, 0.9, 1.0])


@pytest.mark.long
def test_sdn_from_outside_the_package_trains_and_evaluates(tmp_path):
  """`config.method='examples.shallow_deep:sdn'`: trained by the project's
  loop, its loss the tau-weighted sum, evaluated budgeted and in the
  cascade."""
  config = tiny_train_config('sklearn_digits', num_steps=3,
                             method='examples.shallow_deep:sdn')
  config.dataset.data_dir = str(tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert len(results['budgeted']) == NUM_BUDGETS
  assert len(results['anytime']['top1']) == 3
  rows = [json.loads(line) for line in
          (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  logged = [r for r in rows if 'train/weight_exit1' in r]
  assert logged
  # 157 iterations an epoch at batch 8, so three iterations are one epoch
  # of one: tau = min(C, 0.01 + C) = C, with C = 0.9 k / 2 for the tiny
  # network's two internal classifiers.
  for k, c in enumerate((0.45, 0.9, 1.0)):
    assert logged[0][f'train/weight_exit{k + 1}'] == pytest.approx(c)
  cascade = _cascade(config, tmp_path / 'run')
  assert cascade[0]['same_predictions'] == 1.0
  assert cascade[0]['same_exits'] == 1.0


@pytest.mark.long
def test_tiny_backbone_and_weight_net_from_outside_the_package_train(
    tmp_path):
  """`config.model.name='examples.tiny_backbone:tiny_cnn'` with the weight
  net and meta objective of `examples.confidence_weight_net` named in
  `config.meta`: the training loop runs L2W-DEN on them (meta step
  included), the budgeted evaluation and FLOPs count the three exits, and
  the cascade exits early on the backbone as simulated. (One run for both
  plug-ins keeps the suite short.)"""
  config = tiny_train_config('sklearn_digits', num_steps=3)
  config.model.name = 'examples.tiny_backbone:tiny_cnn'
  config.meta.weight_net = 'examples.confidence_weight_net:confidence'
  config.meta.objective = 'examples.confidence_weight_net:mean_ce'
  config.meta.interval = 1
  config.dataset.data_dir = str(tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['iterations'] == 3
  assert len(results['anytime']['top1']) == 3
  assert len(results['budgeted']) == NUM_BUDGETS
  flops = results['mflops_per_exit']
  assert flops[0] < flops[1] < flops[2]
  rows = [json.loads(line) for line in
          (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  logged = [r for r in rows if 'train/meta_loss' in r]
  assert logged and np.isfinite(logged[-1]['train/meta_loss'])
  # The example's weights lie in (0, 2) and differ between exits.
  weights = [logged[-1][f'train/weight_exit{k + 1}'] for k in range(3)]
  assert all(0 < w < 2 for w in weights) and len(set(weights)) == 3
  cascade = _cascade(config, tmp_path / 'run')
  assert [r['budget_index'] for r in cascade] == [5, 39]
  for row in cascade:
    assert row['same_predictions'] == 1.0 and row['same_exits'] == 1.0


def _confidence_config(**overrides):
  config = tiny_config(**overrides)
  config.meta.weight_net = 'examples.confidence_weight_net:confidence'
  config.meta.objective = 'examples.confidence_weight_net:mean_ce'
  return config


def test_weight_net_and_objective_from_the_config_are_the_api_path():
  """`meta.weight_net` / `meta.objective` = the example's pieces: the
  method's meta step is `api.meta_gradient` with the example's weight
  function and mean-CE objective (its loss, weights and meta-gradient),
  and the real step weights the losses with the example's weights."""
  from examples import confidence_weight_net as example  # pylint: disable=g-import-not-at-top
  learner = build_learner(_confidence_config())
  assert isinstance(learner.weight_net, example.ConfidenceExitNet)
  state = init_train_state(learner, jax.random.PRNGKey(0), TINY_IMAGE)
  assert 'exit_embedding' in state.meta_params
  images = jax.random.normal(jax.random.PRNGKey(1), (8,) + TINY_IMAGE)
  labels = jnp.arange(8) % 5
  (xt, yt), (xm, ym) = split_halves(images, labels)
  new, metrics = jax.jit(functools.partial(
      l2w.l2w_half_step, learner, with_meta=True))(state, xt, yt, xm, ym,
                                                   0.1, 1e-2)
  (want_loss, (want_weights, _)), want_grads = api.meta_gradient(
      state.meta_params, params=state.params, opt_state=state.opt_state,
      losses_fn=api.backbone_loss_fn(learner.model, state.batch_stats),
      weight_fn=example.confidence_weights(learner.weight_net),
      objective_fn=example.mean_exit_loss, optimizer=learner.tx,
      train_batch=(xt, yt), meta_batch=(xm, ym), learning_rate=0.1)
  np.testing.assert_allclose(metrics['meta_loss'], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['pseudo_weights'], want_weights,
                             rtol=1e-5)
  chex.assert_trees_all_close(metrics['meta_grads'], want_grads, rtol=1e-4,
                              atol=1e-7)
  # The real step's weights: the example's net at the updated parameters.
  losses, (logits, _) = backbone_losses(learner.model, state.params,
                                        state.batch_stats, xt, yt)
  np.testing.assert_allclose(
      metrics['weights'], example.confidence_weights(learner.weight_net)(
          new.meta_params, losses, logits), rtol=1e-5)
  assert 0 < float(jnp.min(metrics['weights'])) and float(
      jnp.max(metrics['weights'])) < 2


def test_unknown_pieces_are_named():
  config = _confidence_config()
  config.meta.objective = 'examples.confidence_weight_net:median_ce'
  with pytest.raises(ValueError, match="meta.objective: unknown "
                     "'examples.confidence_weight_net:median_ce'"):
    build_learner(config)
  config = tiny_config()
  config.meta.weight_net = 'transformer'
  with pytest.raises(ValueError, match="meta.weight_net: unknown "
                     "'transformer'; available: .*'mlp'"):
    build_learner(config)


def test_module_and_name_must_match_the_registering_module():
  """An entry found by `module:name` is the one that module registered,
  not a namesake from another module imported earlier."""
  from examples import shallow_deep, tiny_backbone  # pylint: disable=g-import-not-at-top,unused-import
  from l2w_jax import models  # pylint: disable=g-import-not-at-top
  from l2w_jax.meta import pieces  # pylint: disable=g-import-not-at-top
  from l2w_jax.training import registry  # pylint: disable=g-import-not-at-top
  assert registry.get('examples.shallow_deep:sdn') is registry.get('sdn')
  with pytest.raises(ValueError, match="method: 'examples.tiny_backbone:"
                     "sdn': 'examples.tiny_backbone' does not register it"):
    registry.get('examples.tiny_backbone:sdn')
  with pytest.raises(ValueError, match='does not register it'):
    models.get_backbone('examples.shallow_deep:tiny_cnn')
  with pytest.raises(ValueError, match='does not register it'):
    pieces.objective('examples.shallow_deep:allocation')
  assert pieces.objective('l2w_jax.meta.pieces:allocation') is (
      pieces.objective('allocation'))
