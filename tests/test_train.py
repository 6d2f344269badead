"""The training program end to end on tiny configs (real pipeline code)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from l2w_jax.training import train
from l2w_jax.training.checkpoint import CheckpointError
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import tiny_train_config


def _check_results(results, workdir, num_exits=3):
  assert len(results['anytime']['top1']) == num_exits
  assert len(results['anytime']['top5']) == num_exits
  assert len(results['budgeted']) == 39
  assert [r['budget_index'] for r in results['budgeted']] == list(range(1, 40))
  assert all(0 <= r['test_top1'] <= 100 for r in results['budgeted'])
  mflops = results['mflops_per_exit']
  assert len(mflops) == num_exits and mflops == sorted(mflops)
  # Expected cost lies between the cheapest and the full network.
  assert all(mflops[0] - 1e-9 <= r['mflops'] <= mflops[-1] + 1e-9
             for r in results['budgeted'])
  assert len(results['params_sha256']) == 64
  on_disk = json.loads((workdir / train.RESULTS_FILE).read_text())
  assert on_disk['params_sha256'] == results['params_sha256']
  assert (workdir / train.PLOT_FILE).stat().st_size > 10_000
  rows = [json.loads(l) for l in
          (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [r['step'] for r in rows if 'train/loss' in r]
  assert steps and all(np.isfinite(r['train/loss']) for r in rows
                       if 'train/loss' in r)
  assert any(d.startswith('events') for d in
             os.listdir(workdir / 'tensorboard'))


@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100', 'cifar100_lt',
                                     'imagenet2012'])
def test_train_and_evaluate_on_mock_datasets(dataset, tmp_path):
  config = tiny_train_config(dataset, num_steps=2)
  with tfds.testing.mock_data(num_examples=48):
    results = train.train_and_evaluate(config, str(tmp_path))
  _check_results(results, tmp_path)
  assert results['iterations'] == 2 and results['dataset'] == dataset


def test_resuming_continues_the_same_run(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=5)
  config.dataset.data_dir = str(tmp_path / 'data')
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  first = train.train_and_evaluate(config, str(tmp_path / 'split'),
                                   interrupt_at_step=2)
  assert first == {'interrupted_at': 2}
  resumed = train.train_and_evaluate(config, str(tmp_path / 'split'))
  assert resumed['iterations'] == whole['iterations'] == 5
  assert resumed['params_sha256'] == whole['params_sha256']
  assert resumed['budgeted'] == whole['budgeted']
  _check_results(resumed, tmp_path / 'split')


def test_uniform_method_trains(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=2, method='uniform')
  config.dataset.data_dir = str(tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['method'] == 'uniform'


def test_missing_dataset_stops_before_compiling(tmp_path):
  start = time.perf_counter()
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=configs/cifar100.py', f'--workdir={tmp_path / "run"}',
       f'--config.dataset.data_dir={tmp_path / "empty"}'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 1
  assert 'cifar100' in out.stderr and 'download_and_prepare' in out.stderr
  assert not (tmp_path / 'run').exists()
  # Import time only: nothing was compiled or trained.
  assert time.perf_counter() - start < 120


def test_bad_config_fields_are_named(tmp_path):
  config = tiny_train_config()
  config.method = 'distillation'
  with pytest.raises(ValueError, match='method'):
    train.train_and_evaluate(config, str(tmp_path))
  config = tiny_train_config()
  config.eval.threshold_source = 'moon'
  with pytest.raises(ValueError, match='eval.threshold_source'):
    train.train_and_evaluate(config, str(tmp_path))


def test_nan_loss_stops_and_keeps_the_good_checkpoint(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=40)
  config.dataset.data_dir = str(tmp_path / 'data')
  config.train.checkpoint_every_steps = 1
  config.train.lr = 1e30  # diverges within a few iterations
  with pytest.raises(train.TrainingDiverged, match='became'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  checkpoints = tmp_path / 'run' / 'checkpoints'
  steps = sorted(int(p.name) for p in checkpoints.iterdir()
                 if p.name.isdigit())
  if steps:  # whatever was saved is finite
    from l2w_jax.training.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
    from l2w_jax.training.learner import build_learner, init_train_state  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    learner = build_learner(config)
    template = init_train_state(learner, jax.random.PRNGKey(0), (32, 32, 3))
    state, _ = Checkpointer(str(checkpoints)).restore(template)
    assert all(np.all(np.isfinite(x)) for x in
               jax.tree_util.tree_leaves(state.params))


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=2)
  config.dataset.data_dir = str(tmp_path / 'data')
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  step_dir = tmp_path / 'run' / 'checkpoints' / '2'
  files = [p for p in step_dir.rglob('*') if p.is_file() and
           p.stat().st_size > 0 and 'state' in str(p)]
  assert files
  for path in files:
    path.write_bytes(b'garbage')
  with pytest.raises(CheckpointError, match='cannot be restored') as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(step_dir) in str(error.value)
  assert step_dir.exists()


def test_sigterm_saves_and_the_rerun_finishes(tmp_path):
  workdir = tmp_path / 'run'
  args = [sys.executable, '-m', 'experiments.main',
          '--config=tests/tiny_digits_config.py', f'--workdir={workdir}',
          f'--config.dataset.data_dir={tmp_path / "data"}',
          '--config.train.num_steps=400']
  process = subprocess.Popen(args, cwd=PROJECT_ROOT, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  for line in process.stdout:
    if line.startswith('step 3/'):
      process.send_signal(signal.SIGTERM)
      break
  output = process.communicate(timeout=300)[0]
  assert process.returncode == 0, output
  assert 'interrupted: checkpoint saved at iteration' in output
  saved = [int(p.name) for p in (workdir / 'checkpoints').iterdir()
           if p.name.isdigit()]
  assert saved and 3 <= max(saved) < 400
  assert not (workdir / train.RESULTS_FILE).exists()
