"""experiments.evaluate (budgeted and cascade modes) and experiments.plot on
a tiny trained digits run."""

import json
import subprocess
import sys

import numpy as np
import pytest

from l2w_jax.training import train
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import tiny_train_config

pytestmark = pytest.mark.long


def _run(*args):
  out = subprocess.run([sys.executable, '-m', *args], cwd=PROJECT_ROOT,
                       env=subprocess_env(), capture_output=True, text=True,
                       timeout=600)
  return out


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  config = tiny_train_config('sklearn_digits', num_steps=3)
  config.dataset.data_dir = str(root / 'data')
  results = {'l2w': train.train_and_evaluate(config, str(root / 'l2w'))}
  return root, results


def test_evaluate_reproduces_the_training_results(trained_run):
  root, results = trained_run
  out = _run('experiments.evaluate', '--config=tests/tiny_digits_config.py',
             f'--workdir={root / "l2w"}', f'--out={root / "again"}',
             f'--config.dataset.data_dir={root / "data"}')
  assert out.returncode == 0, out.stderr[-2000:]
  again = json.loads((root / 'again' / 'results.json').read_text())
  for key in ('anytime', 'mflops_per_exit', 'params_sha256'):
    assert again[key] == results['l2w'][key], key
  # Everything per budget is the same, the thresholds to float32 rounding:
  # they are confidences, which this program (one device) and the training
  # run's evaluation (on its mesh) compile differently.
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'thresholds'}
                        for r in rows]
  assert strip(again['budgeted']) == strip(results['l2w']['budgeted'])
  np.testing.assert_allclose(
      [r['thresholds'] for r in again['budgeted']],
      [r['thresholds'] for r in results['l2w']['budgeted']], rtol=1e-6)
  assert again['iterations'] == 3


def test_cascade_mode_reports_each_budget(trained_run):
  root, _ = trained_run
  out = _run('experiments.evaluate', '--config=tests/tiny_digits_config.py',
             f'--workdir={root / "l2w"}', '--mode=cascade', '--budgets=5,39',
             '--batch_size=16', '--latency_images=10',
             f'--config.dataset.data_dir={root / "data"}')
  assert out.returncode == 0, out.stderr[-2000:]
  rows = json.loads((root / 'l2w' / 'cascade.json').read_text())
  assert [r['budget_index'] for r in rows] == [5, 39]
  for row in rows:
    assert row['same_predictions'] == 1.0 and row['same_exits'] == 1.0
    assert row['single_same_as_simulated'] == 1.0
    assert row['flops_speedup'] >= 1.0 and row['batch_ms_per_image'] > 0
    assert abs(sum(row['exit_fractions']) - 1.0) < 1e-9
  assert 'FLOPs x' in out.stdout


def test_evaluate_without_a_run_says_so(tmp_path):
  out = _run('experiments.evaluate', '--config=tests/tiny_digits_config.py',
             f'--workdir={tmp_path}', f'--config.dataset.data_dir={tmp_path}')
  assert out.returncode == 1
  assert 'no checkpoint in' in out.stderr


def test_plot_overlays_runs(trained_run):
  root, results = trained_run
  # A second run: the first one's results with the curve lowered by 5 points.
  (root / 'uniform').mkdir(exist_ok=True)
  other = dict(results['l2w'], method='uniform', budgeted=[
      dict(r, test_top1=r['test_top1'] - 5) for r in results['l2w']['budgeted']])
  (root / 'uniform' / 'results.json').write_text(json.dumps(other))
  figure = root / 'both.png'
  out = _run('experiments.plot',
             f'--workdirs={root / "l2w"},{root / "uniform"}',
             '--labels=L2W,Uniform', f'--out={figure}')
  assert out.returncode == 0, out.stderr[-2000:]
  assert figure.stat().st_size > 10_000
  out = _run('experiments.plot', f'--workdirs={root / "missing"}',
             f'--out={figure}')
  assert out.returncode != 0 and 'no results.json' in out.stderr
