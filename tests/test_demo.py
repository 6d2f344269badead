"""experiments/demo.py: its table, its summary line, and the whole command
on runs that already have results (no training: that is test_train's)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import demo
from tests.conftest import PROJECT_ROOT, subprocess_env

MFLOPS = [0.5, 1.0, 2.0, 3.0]


def _results(method: str, exit_top1: list[float]) -> dict:
  """A results.json dict: budgets 1..39 whose cost and accuracy rise."""
  rows = []
  for b in range(1, 40):
    late = b / 39
    counts = [int(round(540 * (1 - late))), 0, 0, 0]
    counts[3] = 540 - counts[0]
    rows.append({'budget_index': b, 'val_top1': 0.0,
                 'test_top1': exit_top1[0] + late * (exit_top1[3] -
                                                     exit_top1[0]),
                 'mflops': (counts[0] * MFLOPS[0] + counts[3] * MFLOPS[3]) /
                           540, 'thresholds': [0.5, 0.5, 0.5, -1e8],
                 'test_exit_counts': counts})
  return {'anytime': {'top1': exit_top1, 'top5': exit_top1},
          'budgeted': rows, 'mflops_per_exit': MFLOPS, 'method': method,
          'iterations': 232, 'num_test': 540}


RUNS = [('l2w', _results('l2w', [70.0, 75.0, 80.0, 82.5])),
        ('uniform', _results('uniform', [69.0, 74.0, 78.0, 81.0]))]


def test_budget_table_rows_are_the_requested_budgets():
  lines = demo.budget_table(RUNS, [1, 20, 39]).splitlines()
  assert lines[0].split() == ['budget', 'l2w', 'MFLOPs', 'l2w', 'top-1',
                              'uniform', 'MFLOPs', 'uniform', 'top-1']
  cells = [line.split() for line in lines[1:]]
  assert [c[0] for c in cells] == ['1', '20', '39']
  last = RUNS[0][1]['budgeted'][38]
  assert cells[2][1:3] == [f"{last['mflops']:.2f}", f"{last['test_top1']:.2f}"]
  assert float(cells[0][2]) < float(cells[2][2])  # rises with the budget


def test_exit_summary_gives_the_gap_between_first_and_last_exit():
  line = demo.exit_summary('l2w', RUNS[0][1])
  assert line == ('l2w: test top-1 per exit 70.00 75.00 80.00 82.50 '
                  '(exit 1 -> exit 4: +12.50 points)')


def test_demo_command_draws_runs_that_have_results(tmp_path):
  for label, results in RUNS:
    (tmp_path / label).mkdir()
    (tmp_path / label / 'results.json').write_text(json.dumps(results))
  figure = tmp_path / 'figure.png'
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.demo', f'--workdir={tmp_path}',
       f'--figure={figure}', '--table_budgets=1,39', '--budget_index=5'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  out = done.stdout
  assert 'l2w: read' in out and 'uniform: read' in out
  assert '(exit 1 -> exit 4: +12.50 points)' in out
  assert '(exit 1 -> exit 4: +12.00 points)' in out
  table = out[out.index('budgeted top-1'):].splitlines()[2:4]
  assert [row.split()[0] for row in table] == ['1', '39']
  assert f'figure: {figure}' in out
  # A real 3-panel PNG, not an empty file.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(figure) as image:
    width, height = image.size
    pixels = np.asarray(image.convert('L'))
  assert width > 2 * height and pixels.std() > 10


def test_demo_refuses_an_unknown_method_before_training(tmp_path):
  done = subprocess.run(
      [sys.executable, '-m', 'experiments.demo', f'--workdir={tmp_path}',
       '--methods=l2w,nope'], cwd=PROJECT_ROOT, env=subprocess_env(),
      capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]  # after TensorFlow's banner
  assert last.startswith('error: ') and "'nope'" in last
  assert not (tmp_path / 'l2w').exists()
