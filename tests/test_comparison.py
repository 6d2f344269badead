"""Mean and spread over seeds, and the comparison benchmark's driver."""

import json
import subprocess
import sys

import numpy as np
import pytest

from l2w_jax.evaluation import comparison
from tests.conftest import PROJECT_ROOT, subprocess_env


def _results(seed: int, method: str = 'l2w') -> dict:
  """A results.json-like dict whose numbers depend on the seed."""
  rng = np.random.default_rng(seed)
  rows = [{'budget_index': i, 'mflops': 1.0 + i / 10 + seed / 100,
           'test_top1': float(rng.uniform(50, 90)), 'val_top1': 0.0}
          for i in range(39, 0, -1)]  # unsorted on purpose
  return {'budgeted': rows, 'anytime': {'top1': [60.0 + seed, 70.0, 80.0 - seed]},
          'mflops_per_exit': [1.0, 3.0, 5.0], 'iterations': 7,
          'dataset': 'toy', 'method': method}


def test_summary_is_the_mean_and_std_over_seeds_per_budget():
  runs = [_results(s) for s in (0, 1, 2)]
  summary = comparison.summarise_seeds(runs, 'L2W')
  top1 = np.array([[r['test_top1'] for r in sorted(
      run['budgeted'], key=lambda r: r['budget_index'])] for run in runs])
  np.testing.assert_allclose(summary.budget_top1, top1.mean(axis=0))
  np.testing.assert_allclose(summary.budget_top1_std, top1.std(axis=0))
  np.testing.assert_allclose(summary.budget_mflops[0], 1.1 + 0.01)
  np.testing.assert_allclose(summary.exit_top1, [61.0, 70.0, 79.0])
  np.testing.assert_allclose(summary.exit_top1_std,
                             [np.std([60, 61, 62]), 0.0, np.std([80, 79, 78])])
  assert summary.num_seeds == 3


def test_runs_that_do_not_line_up_are_refused():
  odd = _results(1)
  odd['budgeted'] = odd['budgeted'][1:]
  with pytest.raises(ValueError, match='different budgets or exits'):
    comparison.summarise_seeds([_results(0), odd], 'L2W')
  with pytest.raises(ValueError, match='no runs'):
    comparison.summarise_seeds([], 'L2W')


def test_benchmark_reads_finished_runs_and_plots_them(tmp_path):
  for method in ('l2w', 'uniform'):
    for seed in (0, 1):
      run = tmp_path / 'runs' / method / f'seed{seed}'
      run.mkdir(parents=True)
      (run / 'results.json').write_text(json.dumps(_results(seed, method)))
  figure = tmp_path / 'methods.png'
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.compare_methods',
       '--methods=l2w,uniform', '--seeds=0,1',
       f'--workdir={tmp_path / "runs"}', f'--figure={figure}'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  line = json.loads(out.stdout.strip().splitlines()[-1])
  assert line['seeds'] == [0, 1]
  budget = [np.mean([r['test_top1'] for r in _results(s)['budgeted']])
            for s in (0, 1)]
  assert line['l2w']['budgeted_top1_mean'] == round(float(np.mean(budget)), 2)
  assert line['l2w']['budgeted_top1_std'] == round(float(np.std(budget)), 2)
  assert line['uniform']['top1_per_exit_mean'] == [60.5, 70.0, 79.5]
  assert line['l2w']['seconds_trained'] == 0.0  # read, not retrained
  assert figure.stat().st_size > 10_000


def test_an_unknown_method_stops_the_benchmark_before_training(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'benchmarks.compare_methods',
       '--methods=l2w,telepathy', f'--workdir={tmp_path}'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert out.returncode != 0
  assert "unknown training method 'telepathy'" in out.stderr
  assert not (tmp_path / 'l2w').exists()
