"""The examples run (reduced: a few iterations)."""

import importlib.util
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from l2w_jax.meta.weighting import NUM_BUDGETS
from l2w_jax.training import train
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import tiny_train_config


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


def _cascade(tmp_path, *flags) -> list:
  """`experiments.evaluate --mode=cascade` at budgets 5 and 39 on the run
  in tmp_path/run; its rows."""
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.evaluate',
       '--config=tests/tiny_digits_config.py', *flags,
       f'--workdir={tmp_path / "run"}', '--mode=cascade', '--budgets=5,39',
       '--batch_size=16', '--latency_images=4',
       f'--config.dataset.data_dir={tmp_path / "data"}'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads((tmp_path / 'run' / 'cascade.json').read_text())


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
  cascade by `experiments.evaluate`."""
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
  cascade = _cascade(tmp_path, '--config.method=examples.shallow_deep:sdn')
  assert cascade[0]['same_predictions'] == 1.0
  assert cascade[0]['same_exits'] == 1.0


@pytest.mark.long
def test_tiny_backbone_from_outside_the_package_trains_and_evaluates(
    tmp_path):
  """`config.model.name='examples.tiny_backbone:tiny_cnn'`: L2W-DEN trains
  it (meta step included), the budgeted evaluation and FLOPs count its
  three exits, and the cascade exits early on it as simulated."""
  config = tiny_train_config('sklearn_digits', num_steps=3)
  config.model.name = 'examples.tiny_backbone:tiny_cnn'
  config.meta.interval = 1
  config.dataset.data_dir = str(tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert len(results['anytime']['top1']) == 3
  assert len(results['budgeted']) == NUM_BUDGETS
  flops = results['mflops_per_exit']
  assert flops[0] < flops[1] < flops[2]
  rows = [json.loads(line) for line in
          (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert any('train/meta_loss' in r for r in rows)
  cascade = _cascade(tmp_path,
                     '--config.model.name=examples.tiny_backbone:tiny_cnn')
  assert [r['budget_index'] for r in cascade] == [5, 39]
  for row in cascade:
    assert row['same_predictions'] == 1.0 and row['same_exits'] == 1.0
