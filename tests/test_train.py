"""The training program end to end on tiny configs (real pipeline code)."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from l2w_jax import data
from l2w_jax.training import divergence
from l2w_jax.training import train
from l2w_jax.training.checkpoint import Checkpointer
from l2w_jax.training.learner import build_learner, init_train_state
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import restore_state, tiny_train_config


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


# cifar10 trains through the same program in test_training_loop.py.
@pytest.mark.parametrize('dataset', ['cifar100', 'cifar100_lt',
                                     'imagenet2012'])
def test_train_and_evaluate_on_mock_datasets(dataset, tmp_path):
  config = tiny_train_config(dataset, num_steps=2)
  with tfds.testing.mock_data(num_examples=48):
    results = train.train_and_evaluate(config, str(tmp_path))
  _check_results(results, tmp_path)
  assert results['iterations'] == 2 and results['dataset'] == dataset


@pytest.mark.long
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


def _metric_rows(workdir):
  return [json.loads(l) for l in
          (workdir / 'metrics.jsonl').read_text().splitlines()
          if '"step"' in l]


def test_uniform_method_trains_the_backbone_with_unit_weights(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=2, method='uniform')
  config.dataset.data_dir = str(tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['method'] == 'uniform'
  rows = [r for r in _metric_rows(tmp_path / 'run') if 'train/loss' in r]
  assert [r['step'] for r in rows] == [1, 2]
  for row in rows:
    # With unit weights the training loss is the plain sum of the exits'.
    assert row['train/loss'] == pytest.approx(
        sum(row[f'train/loss_exit{k}'] for k in (1, 2, 3)), rel=1e-6)
    assert [row[f'train/weight_exit{k}'] for k in (1, 2, 3)] == [1.0] * 3
    assert 'train/meta_loss' not in row
  learner = build_learner(config)
  initial = init_train_state(learner, jax.random.PRNGKey(config.seed),
                             (32, 32, 3))
  final = restore_state(config, tmp_path / 'run' / 'checkpoints')
  assert int(final.step) == 2
  chex.assert_trees_all_equal(final.meta_params, initial.meta_params)
  chex.assert_trees_all_equal(final.meta_opt_state, initial.meta_opt_state)
  changed = jax.tree_util.tree_map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
      final.params, initial.params)
  assert all(jax.tree_util.tree_leaves(changed))  # every backbone array moved


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
  config.eval.protocol = 'moon'
  with pytest.raises(ValueError, match='eval.protocol'):
    train.train_and_evaluate(config, str(tmp_path))


def test_nan_loss_stops_and_keeps_the_good_checkpoint(tmp_path):
  config = tiny_train_config('sklearn_digits', num_steps=40)
  config.dataset.data_dir = str(tmp_path / 'data')
  config.train.checkpoint_every_steps = 1
  # Finite after iteration 1, NaN weights at iteration 2 (so for every lr
  # tried from 2e3 to 3e4; at 1e3 rounding, e.g. BatchNorm's derivative
  # rule, decided between iterations 2 and 3).
  config.train.lr = 1e4
  with pytest.raises(divergence.TrainingDiverged) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  # The weights go first: every exit's loss is still finite.
  assert message.startswith("exit 1's mean weight became nan at iteration 2")
  assert 'the newest checkpoint (iteration 1) is untouched' in message
  assert 'resumes from it' in message
  checkpoints = tmp_path / 'run' / 'checkpoints'
  assert sorted(p.name for p in checkpoints.iterdir()
                if p.name.isdigit()) == ['1']
  state = restore_state(config, checkpoints)
  assert int(state.step) == 1
  chex.assert_tree_all_finite(state)
  learner = build_learner(config)
  initial = init_train_state(learner, jax.random.PRNGKey(config.seed),
                             (32, 32, 3))
  # Iteration 1 did change the state (huge but finite).
  assert not np.array_equal(state.params['classifier_2']['linear']['kernel'],
                            initial.params['classifier_2']['linear']['kernel'])


def test_a_non_finite_state_is_never_saved(tmp_path):
  """The state check runs before every save, not only when losses are logged."""
  config = tiny_train_config('sklearn_digits', num_steps=2)
  learner = build_learner(config)
  state = init_train_state(learner, jax.random.PRNGKey(0), (32, 32, 3))
  bad = state.replace(meta_params=jax.tree_util.tree_map(
      lambda x: x.at[(0,) * x.ndim].set(np.inf), state.meta_params))
  checkpointer = Checkpointer(str(tmp_path / 'checkpoints'))
  try:
    divergence.check_state_finite(state, 3, checkpointer)
    with pytest.raises(divergence.TrainingDiverged,
                       match=r'state became non-finite \(first: '
                       r'\.meta_params.*\) at iteration 3.*no checkpoint'):
      divergence.check_state_finite(bad, 3, checkpointer)
  finally:
    checkpointer.close()


@pytest.mark.long
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
