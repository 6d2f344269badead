"""The training loop's schedule: learning rates per iteration, meta steps
every `meta.interval` batches of an epoch, epoch ends, and resuming there.

Runs on mock CIFAR-10 with 40 training images in batches of 8, so an epoch
is 5 iterations and an 8-iteration run crosses one epoch boundary.
"""

import json
import math

import chex
import jax
import pytest
import tensorflow_datasets as tfds

from l2w_jax import data
from l2w_jax.training import config_checks
from l2w_jax.training import train
from l2w_jax.training.checkpoint import Checkpointer
from l2w_jax.training.learner import build_learner, init_train_state
from l2w_jax.training import registry
from l2w_jax.training.schedules import (cosine_learning_rate,
                                        iteration_schedule, learning_rate)
from tests.tiny import tiny_train_config

pytestmark = pytest.mark.long

STEPS_PER_EPOCH = 5
TOTAL = 8


def _cosine(base, iteration, total):
  return base * (1 + math.cos(math.pi * iteration / total)) / 2


def test_cosine_learning_rate_formula():
  assert cosine_learning_rate(0.8, 0, 100) == 0.8
  assert cosine_learning_rate(0.8, 50, 100) == pytest.approx(0.4, rel=1e-15)
  assert cosine_learning_rate(0.8, 100, 100) == pytest.approx(0.0, abs=1e-16)
  for t in (1, 7, 99):
    assert cosine_learning_rate(0.8, t, 100) == pytest.approx(
        _cosine(0.8, t, 100), rel=1e-15)
  with pytest.raises(ValueError, match='positive number of iterations'):
    cosine_learning_rate(0.8, 0, 0)


def test_multistep_learning_rate_divides_at_epoch_milestones():
  import ml_collections  # pylint: disable=g-import-not-at-top
  train_config = ml_collections.ConfigDict({
      'lr': 0.1, 'schedule': 'multistep', 'lr_milestones': (0.5, 0.75),
      'lr_gamma': 0.1})
  # 300 epochs of 10 iterations: /10 from epoch 150, /100 from epoch 225.
  rates = {epoch: learning_rate(train_config, epoch * 10 + 9, 3000, 10)
           for epoch in (0, 149, 150, 224, 225, 299)}
  assert rates == pytest.approx({0: 0.1, 149: 0.1, 150: 0.01, 224: 0.01,
                                 225: 0.001, 299: 0.001}, rel=1e-15)
  train_config.schedule = 'cosine'
  assert learning_rate(train_config, 5, 10, 3) == pytest.approx(
      _cosine(0.1, 5, 10), rel=1e-15)
  train_config.schedule = 'step'
  with pytest.raises(ValueError, match='train.schedule'):
    learning_rate(train_config, 5, 10, 3)
  train_config.schedule = 'multistep'
  train_config.lr_milestones = (0.5, 1.5)
  with pytest.raises(ValueError, match=r'train.lr_milestones: .*\(0, 1\]'):
    learning_rate(train_config, 5, 10, 3)
  config = _config()  # the same check before anything compiles
  config.train.schedule = 'multistep'
  config.train.lr_milestones = (0.0,)
  with pytest.raises(ValueError, match='train.lr_milestones'):
    config_checks.validate_config(config)


def test_iteration_schedule_restarts_the_meta_interval_every_epoch():
  """L2W-DEN's rule (the l2w_training fixture's pattern): a meta step iff
  the index within the epoch is a multiple of meta.interval; both rates
  cosine over the run, per iteration."""
  config = _config()
  config.meta.lr = 1e-3
  plan = registry.phase_plan(config, 6)
  schedule = [iteration_schedule(config, plan, t, 3) for t in range(6)]
  assert [s.with_meta for s in schedule] == [True, False, True, True, False,
                                             True]
  assert [s.lr for s in schedule] == [
      cosine_learning_rate(config.train.lr, t, 6) for t in range(6)]
  assert [s.meta_lr for s in schedule] == [
      cosine_learning_rate(1e-3, t, 6) for t in range(6)]
  assert not any(s.starts_phase for s in schedule)
  # A two-phase method: the second phase restarts the backbone's schedule
  # (and its optimizer), the weight net's cosine spans the run.
  config.method = 'regime_disjoint'
  plan = registry.phase_plan(config, 6)
  second = plan[1]
  first_of_second = iteration_schedule(config, plan, second.start, 3)
  assert first_of_second.starts_phase and first_of_second.phase == second
  assert first_of_second.lr == config.train.lr
  assert not iteration_schedule(config, plan, second.start + 1,
                                3).starts_phase


def _config():
  config = tiny_train_config('cifar10', num_steps=TOTAL)
  config.meta.interval = 2
  config.train.log_every_steps = 3
  config.train.checkpoint_every_steps = 1
  config.train.keep_checkpoints = TOTAL + 1
  config.train.eval_every_epochs = 1
  return config


def _rows(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [r for r in map(json.loads, lines) if 'step' in r]


def _recording(monkeypatch):
  """Records the start_step of every train_stream call."""
  calls = []
  original = data.train_stream

  def train_stream(config, start_step=0, **kwargs):
    calls.append(start_step)
    return original(config, start_step=start_step, **kwargs)

  monkeypatch.setattr(data, 'train_stream', train_stream)
  return calls


def _saving_synchronously(monkeypatch):
  """Makes every save wait until it is written. While tfds.testing.mock_data
  builds a dataset (each epoch start and evaluation here) it swaps
  etils.epath and tf.io.gfile for a temporary directory, process-wide: a
  background save running then would write part of a checkpoint there."""
  save = Checkpointer.save

  def save_and_wait(self, *args, **kwargs):
    save(self, *args, **kwargs)
    self.wait_until_finished()

  monkeypatch.setattr(Checkpointer, 'save', save_and_wait)


@pytest.fixture(scope='session')
def runs(tmp_path_factory):
  """An uninterrupted run and one stopped at the end of epoch 1, resumed."""
  base = tmp_path_factory.mktemp('loop')
  config = _config()
  with pytest.MonkeyPatch.context() as monkeypatch, \
      tfds.testing.mock_data(num_examples=48):
    _saving_synchronously(monkeypatch)
    calls = _recording(monkeypatch)
    whole = train.train_and_evaluate(config, str(base / 'whole'))
    whole_calls = list(calls)
    calls.clear()
    stopped = train.train_and_evaluate(config, str(base / 'split'),
                                       interrupt_at_step=STEPS_PER_EPOCH)
    stopped_calls = list(calls)
    calls.clear()
    resumed = train.train_and_evaluate(config, str(base / 'split'))
    resumed_calls = list(calls)
  return dict(config=config, base=base, whole=whole, stopped=stopped,
              resumed=resumed, calls=(whole_calls, stopped_calls,
                                      resumed_calls))


def test_one_stream_per_run_started_where_the_checkpoint_is(runs):
  whole_calls, stopped_calls, resumed_calls = runs['calls']
  assert whole_calls == [0]  # one pipeline across both epochs
  assert stopped_calls == [0]
  # The checkpoint sits exactly at an epoch end: the stream resumes there.
  assert resumed_calls == [STEPS_PER_EPOCH]


def test_logs_at_the_interval_at_epoch_ends_and_at_the_end(runs):
  rows = _rows(runs['base'] / 'whole')
  train_rows = {r['step']: r for r in rows if 'train/loss' in r}
  assert sorted(train_rows) == [3, 5, 6, 8]  # every 3, epoch end, last
  assert train_rows[5]['epoch'] == 1.0
  # Evaluation every epoch, before the last iteration: after iteration 5.
  assert [r['step'] for r in rows if 'val/acc_exit1' in r] == [5]
  for step, row in train_rows.items():  # the last iteration of its window
    assert row['train/lr'] == _cosine(0.1, step - 1, TOTAL)
    assert row['train/meta_lr'] == _cosine(1e-2, step - 1, TOTAL)


def test_resumed_run_logs_the_same_learning_rates(runs):
  rows = [r for r in _rows(runs['base'] / 'split') if 'train/loss' in r]
  assert [r['step'] for r in rows] == [3, 5, 6, 8]
  whole = [r for r in _rows(runs['base'] / 'whole') if 'train/loss' in r]
  for a, b in zip(rows, whole, strict=True):
    assert (a['train/lr'], a['train/meta_lr']) == (b['train/lr'],
                                                   b['train/meta_lr'])


def test_meta_steps_follow_the_batch_index_within_the_epoch(runs):
  """interval 2, 5 batches an epoch: meta steps at batches 0, 2, 4 of epoch 0
  and 0, 2 of epoch 1 (iterations 1, 3, 5, 6, 8); the weight net and its
  optimizer state stay untouched by the others."""
  config = runs['config']
  learner = build_learner(config)
  with tfds.testing.mock_data(num_examples=48):
    shape = data.data_info(config).image_shape
  state = init_train_state(learner, jax.random.PRNGKey(config.seed), shape)
  checkpointer = Checkpointer(str(runs['base'] / 'whole' / 'checkpoints'))
  try:
    assert checkpointer.all_steps() == list(range(1, TOTAL + 1))
    changed = []
    for step in range(1, TOTAL + 1):
      new, _ = checkpointer.restore(state, step)
      same = jax.tree_util.tree_all(jax.tree_util.tree_map(
          lambda a, b: bool((a == b).all()), new.meta_params,
          state.meta_params))
      if same:
        chex.assert_trees_all_equal(new.meta_opt_state, state.meta_opt_state)
      else:
        changed.append(step)
      state = new
  finally:
    checkpointer.close()
  assert changed == [1, 3, 5, 6, 8]


def test_resuming_at_an_epoch_end_is_bit_identical(runs):
  assert runs['stopped'] == {'interrupted_at': STEPS_PER_EPOCH}
  whole, resumed = runs['whole'], runs['resumed']
  assert resumed['iterations'] == whole['iterations'] == TOTAL
  assert resumed['params_sha256'] == whole['params_sha256']
  assert resumed['anytime'] == whole['anytime']
  assert resumed['budgeted'] == whole['budgeted']


@pytest.mark.long
def test_kept_last_batch_trains_and_resumes_on_two_devices(tmp_path, capsys):
  """The originals' epoch (no drop_last): 40 training images at 16 are 3
  iterations, the last of 8 (4 a device); a run stopped before it resumes
  to the same parameters."""
  config = tiny_train_config('cifar10', num_steps=-1)
  config.train.epochs = 2
  config.train.batch_size = 16
  config.train.last_batch = 'keep'
  config.distributed.num_devices = 2
  with pytest.MonkeyPatch.context() as monkeypatch, \
      tfds.testing.mock_data(num_examples=48):
    _saving_synchronously(monkeypatch)
    whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
    assert '40 training images, 3 iterations/epoch (the last of 8 images)' \
        in capsys.readouterr().out
    stopped = train.train_and_evaluate(config, str(tmp_path / 'split'),
                                       interrupt_at_step=2)
    resumed = train.train_and_evaluate(config, str(tmp_path / 'split'))
  assert stopped == {'interrupted_at': 2}
  assert whole['iterations'] == resumed['iterations'] == 6
  assert resumed['params_sha256'] == whole['params_sha256']
  losses = [r['train/loss'] for r in _rows(tmp_path / 'whole')
            if 'train/loss' in r]
  assert losses and all(math.isfinite(x) for x in losses)
