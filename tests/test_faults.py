"""Fault injection: what an unattended run does with bad checkpoints,
mismatched workdirs, bad numbers, divergence, signals, unwritable workdirs
and bad input files (`pytest -k "fault or corrupt or mismatch or validate
or nan"` selects this file)."""

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from l2w_jax import data
from l2w_jax import paths
from l2w_jax.convert import torch_state
from l2w_jax.training import config_checks
from l2w_jax.training import divergence
from l2w_jax.training import resume, train
from l2w_jax.training import workdir as workdir_lib
from l2w_jax.training.checkpoint import CheckpointError
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import checkpointing_digits_config, restore_state, tiny_train_config


def _config(tmp_path, num_steps=4):
  return checkpointing_digits_config(tmp_path, num_steps)


def _main(*args, timeout=300):
  """experiments.main on the tiny digits config: (returncode, stdout,
  stderr, seconds)."""
  start = time.perf_counter()
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=tests/tiny_digits_config.py', *args], cwd=PROJECT_ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
  return (out.returncode, out.stdout, out.stderr,
          time.perf_counter() - start)


def _truncate(files) -> None:
  for path in files:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


# ----------------------------------------------------------------------------
# 1. Corrupt checkpoints.


def test_corrupt_checkpoints_are_moved_aside_and_the_run_resumes(tmp_path):
  """Checkpoint 3's array files and all of checkpoint 2's files are cut in
  half; the same command moves both aside (nothing deleted), resumes from
  checkpoint 1 and ends bit-identical to an uninterrupted run."""
  config = _config(tmp_path)
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  workdir = tmp_path / 'run'
  assert train.train_and_evaluate(config, str(workdir), interrupt_at_step=3
                                  ) == {'interrupted_at': 3}
  checkpoints = workdir / 'checkpoints'
  _truncate(p for p in (checkpoints / '3' / 'state').rglob('*')
            if p.is_file() and p.parent.name == 'd')
  _truncate(p for p in (checkpoints / '2').rglob('*') if p.is_file())
  resumed = train.train_and_evaluate(config, str(workdir))
  assert resumed['params_sha256'] == whole['params_sha256']
  moved = sorted(p.name.split('-')[0]
                 for p in (workdir / resume.BAD_CHECKPOINTS).iterdir())
  assert moved == ['2', '3']
  assert all(any(p.rglob('*')) for p in
             (workdir / resume.BAD_CHECKPOINTS).iterdir())  # kept, not empty


# ----------------------------------------------------------------------------
# 2. A workdir of another configuration.


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished 2-iteration run of tests/tiny_digits_config.py."""
  base = tmp_path_factory.mktemp('finished')
  config = tiny_train_config('sklearn_digits', num_steps=2)
  config.dataset.data_dir = str(base / 'data')
  results = train.train_and_evaluate(config, str(base / 'run'))
  return config, base, results


def test_mismatched_config_is_refused_in_one_line(finished_run):
  _, base, _ = finished_run
  before = sorted((p, p.stat().st_size) for p in (base / 'run').rglob('*'))
  code, _, err, seconds = _main(
      f'--workdir={base / "run"}', f'--config.dataset.data_dir={base / "data"}',
      '--config.train.num_steps=2', '--config.model.n_channels=8')
  assert code == 1 and 'Traceback' not in err, err
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: ') and (
      'model.n_channels = 4 in the checkpoint, 8 now' in last), last
  assert seconds < 60
  # The refused run wrote nothing into the workdir.
  assert sorted((p, p.stat().st_size)
                for p in (base / 'run').rglob('*')) == before


def test_mismatch_ignores_the_resumable_fields_and_overwrite_moves_aside(
    finished_run, tmp_path):
  config, _, _ = finished_run
  changed = config.copy_and_resolve_references()
  changed.eval.batch_size = 8
  changed.train.log_every_steps = 7
  differences = resume.config_differences(
      json.dumps(json.loads(config.to_json())), changed)
  assert differences == []
  changed.train.lr = 0.05
  changed.seed = 3
  # eval.* may change, but not the protocol: it decides what trains.
  changed.eval.protocol = 'train'
  assert resume.config_differences(config.to_json(), changed) == [
      ('eval.protocol', 'holdout', 'train'), ('seed', 0, 3),
      ('train.lr', 0.1, 0.05)]
  changed.eval.protocol = config.eval.protocol
  # --overwrite: the old run is renamed, a new one starts in its place.
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir), interrupt_at_step=1)
  changed.train.num_steps = 1
  train.train_and_evaluate(changed, str(workdir), overwrite=True)
  old = [p for p in tmp_path.iterdir() if p.name.startswith('run.replaced-')]
  assert len(old) == 1 and (old[0] / 'checkpoints' / '1').is_dir()
  assert (workdir / train.RESULTS_FILE).exists()


def test_mismatched_arrays_without_a_stored_config_stop_and_stay(
    finished_run, tmp_path):
  """A checkpoint whose metadata has no config (as if written by another
  version of the code) and whose arrays do not fit the model: the run stops
  naming it and moves nothing, rather than restarting from scratch."""
  config, base, _ = finished_run
  workdir = tmp_path / 'run'
  shutil.copytree(base / 'run', workdir)
  meta_file = workdir / 'checkpoints' / '2' / 'meta' / 'metadata'
  meta = json.loads(meta_file.read_text())
  del meta['config']
  meta_file.write_text(json.dumps(meta))
  changed = config.copy_and_resolve_references()
  changed.model.n_channels = 8
  with pytest.raises(CheckpointError, match=(
      'checkpoints/2 holds arrays that do not fit the model')):
    train.train_and_evaluate(changed, str(workdir))
  assert (workdir / 'checkpoints' / '2').is_dir()
  assert not (workdir / resume.BAD_CHECKPOINTS).exists()


# ----------------------------------------------------------------------------
# 3. Numbers checked before anything is built.


@pytest.mark.parametrize('field,value,allowed', [
    ('meta.epsilon', -1.0, '>= 0'),
    ('train.lr', float('nan'), 'finite and > 0'),
    ('meta.lr', 0.0, 'finite and > 0'),
    ('train.momentum', 1.0, 'in [0, 1)'),
    ('train.weight_decay', -1e-4, 'finite and >= 0'),
    ('meta.weight_decay', float('inf'), 'finite and >= 0'),
    ('train.label_smoothing', 1.0, 'in [0, 1)'),
    ('train.batch_size', 0, 'an integer > 0 (or set per_device_batch_size)'),
    ('train.keep_checkpoints', 0, 'an integer >= 1'),
    ('train.log_every_steps', 0, 'an integer >= 1'),
    ('train.checkpoint_every_steps', -5, 'an integer >= 1'),
    ('meta.interval', 0, 'an integer >= 1'),
    ('eval.batch_size', 0, 'an integer > 0'),
    ('meta.target_p_index', 40, 'an integer in [1, 39]'),
])
def test_validate_names_the_field_value_and_range(field, value, allowed):
  config = tiny_train_config('sklearn_digits')
  config_checks.validate_config(config)  # the tiny config itself is fine
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(ValueError) as error:
    config_checks.validate_config(config)
  assert str(error.value) == f'{field}: must be {allowed}, got {value!r}'


@pytest.mark.parametrize('changes,message', [
    ({'distributed.reduction': 'tree'},
     "distributed.reduction: unknown reduction 'tree'; use one of "
     "('all_reduce', 'ordered')"),
    ({'distributed.reduction': 'ordered', 'train.sync_bn': True},
     'distributed.reduction=ordered does not cover train.sync_bn (its '
     'statistics are all-reduced): set one of them back to its default'),
])
def test_impossible_reductions_are_named(changes, message):
  config = tiny_train_config('sklearn_digits')
  for field, value in changes.items():
    section, name = field.split('.')
    config[section][name] = value
  with pytest.raises(ValueError) as error:
    config_checks.validate_config(config)
  assert str(error.value) == message


@pytest.mark.parametrize('override,message', [
    ('--config.meta.epsilon=-1', 'error: meta.epsilon: must be >= 0, got -1.0'),
    ('--config.train.lr=nan', 'error: train.lr: must be finite and > 0, got '
     'nan'),
])
def test_validate_stops_the_command_before_compiling(tmp_path, override,
                                                     message):
  start = time.perf_counter()
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.main', '--config=configs/digits.py',
       override, f'--workdir={tmp_path / "run"}'], cwd=PROJECT_ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=60)
  assert time.perf_counter() - start < 15
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == message
  assert not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------
# 4. NaN and Inf.


def test_nan_names_the_iteration_the_quantity_and_the_disk(tmp_path,
                                                           monkeypatch):
  """NaN images from iteration 2 on: the run stops at iteration 2, naming
  exit 1's loss; checkpoint 1 stays the newest, and it is finite. (The
  stream's uint8 images cannot be NaN: the poisoned ones are float32, which
  the step takes as already normalised.)"""
  original = data.train_stream

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
      if i >= 1:
        batch = {**batch, 'image': np.full(batch['image'].shape, np.nan,
                                           np.float32)}
      yield batch

  monkeypatch.setattr(data, 'train_stream', poisoned)
  config = _config(tmp_path)
  with pytest.raises(divergence.TrainingDiverged) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert message.startswith("exit 1's loss became nan at iteration 2:"), (
      message)
  assert 'the newest checkpoint (iteration 1) is untouched' in message
  assert 'no checkpoint' not in message
  state = restore_state(config, tmp_path / 'run' / 'checkpoints')
  assert int(state.step) == 1
  assert all(np.all(np.isfinite(x)) for x in
             jax.tree_util.tree_leaves(state.params))


# ----------------------------------------------------------------------------
# 5. Ctrl-C.


def test_fault_ctrl_c_saves_and_exits_like_sigterm(tmp_path):
  workdir = tmp_path / 'run'
  process = subprocess.Popen(
      [sys.executable, '-m', 'experiments.main',
       '--config=tests/tiny_digits_config.py', f'--workdir={workdir}',
       f'--config.dataset.data_dir={tmp_path / "data"}',
       '--config.train.num_steps=400'], cwd=PROJECT_ROOT, env=subprocess_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in process.stdout:
    if line.startswith('step 2/'):
      process.send_signal(signal.SIGINT)
      break
  output, err = process.communicate(timeout=300)
  assert process.returncode == 0, err
  assert 'SIGINT: saving a checkpoint' in output
  assert 'interrupted: checkpoint saved at iteration' in output
  assert 'Traceback' not in err
  saved = [int(p.name) for p in (workdir / 'checkpoints').iterdir()
           if p.name.isdigit()]
  assert saved and 2 <= max(saved) < 400


@pytest.mark.parametrize('delay', [0.5, 1.5])
def test_fault_ctrl_c_while_starting_stops_in_one_line(tmp_path, delay):
  """A SIGINT while the libraries import (they take seconds): without the
  entry points' hold it printed a traceback (1.5 s) or was swallowed, the
  run training on (0.5 s)."""
  process = subprocess.Popen(
      [sys.executable, '-m', 'experiments.main',
       '--config=tests/tiny_digits_config.py', f'--workdir={tmp_path / "run"}',
       f'--config.dataset.data_dir={tmp_path / "data"}'], cwd=PROJECT_ROOT,
      env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True,
      # SIGINT's default even if this suite runs in the background (where
      # it is ignored, and the child would inherit that).
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  time.sleep(delay)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 130, err[-2000:]
  assert err.strip().splitlines()[-1] == ('interrupted while starting; '
                                          'nothing was done'), err[-2000:]
  assert 'Traceback' not in err
  assert not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------
# 6. Unwritable workdirs and failing writes.


def test_fault_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  config = _config(tmp_path)
  with pytest.raises(workdir_lib.WorkdirError, match=(
      f'cannot write to the workdir {blocker / "run"}')):
    train.train_and_evaluate(config, str(blocker / 'run'))


def test_fault_failing_checkpoint_write_keeps_the_earlier_ones(tmp_path,
                                                               monkeypatch):
  """The second save raises ENOSPC: the run stops naming the path, and
  checkpoint 1 still restores."""
  saves = []
  original = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    saves.append(step)
    if len(saves) > 1:
      raise OSError(28, 'No space left on device')
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  config = _config(tmp_path)
  with pytest.raises(CheckpointError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert f'cannot write checkpoint 2 to {tmp_path / "run" / "checkpoints"}' \
      in message and 'No space left on device' in message
  assert 'the earlier checkpoints ([1]) are untouched' in message
  monkeypatch.setattr(ocp.CheckpointManager, 'save', original)
  assert int(restore_state(config, tmp_path / 'run' / 'checkpoints').step) == 1


def _limited_to(limit: int):
  """A subprocess preexec_fn: no file of the process may grow beyond
  `limit` bytes (RLIMIT_FSIZE; a write past it fails with EFBIG, as one
  on a full disk fails with ENOSPC: Python ignores SIGXFSZ)."""
  def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return limit_file_size


def _limited_main(limit: int, *args) -> subprocess.CompletedProcess:
  """experiments.main with every file limited to `limit` bytes, without
  the compilation cache (its entries would be written truncated)."""
  return subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=tests/tiny_digits_config.py', '--compilation_cache=none',
       *args], cwd=PROJECT_ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=300,
      preexec_fn=_limited_to(limit))


def test_fault_full_disk_keeps_the_checkpoints_and_names_the_space(tmp_path):
  """A run of 2 iterations is resumed for 4 with every file limited in
  size (RLIMIT_FSIZE): first below the size metrics.jsonl has, so its next
  row cannot be written, then below the size of a checkpoint's largest
  file, so checkpoint 3 cannot be written. Each time the command stops with
  one line naming the file and the room one checkpoint takes, checkpoint 2
  still restores, and the rerun with room resumes from it and finishes."""
  config = _config(tmp_path, num_steps=2)
  workdir = tmp_path / 'run'
  checkpoints = workdir / 'checkpoints'
  train.train_and_evaluate(config, str(workdir))
  one_checkpoint = sum(p.stat().st_size for p in (checkpoints / '2').rglob('*')
                       if p.is_file())
  room = f'free at least {paths.megabytes(one_checkpoint)} (one checkpoint)'
  resumed = [f'--workdir={workdir}',
             f'--config.dataset.data_dir={tmp_path / "data"}',
             '--config.train.num_steps=4',
             '--config.train.checkpoint_every_steps=1',
             '--config.train.keep_checkpoints=5']
  metrics = workdir / 'metrics.jsonl'
  largest = max(p.stat().st_size for p in (checkpoints / '2').rglob('*')
                if p.is_file())
  assert metrics.stat().st_size + 5000 < largest // 2  # the limits differ

  run = _limited_main(metrics.stat().st_size, *resumed)
  assert run.returncode == 1, run.stderr
  assert 'Traceback' not in run.stderr
  assert run.stderr.splitlines()[-1] == (
      f'error: cannot write {metrics} (a file would exceed the size this '
      'process may write (ulimit -f)); the checkpoints already saved are '
      f'intact: {room} in {workdir}, then rerun the same command '
      'to resume'), run.stderr

  run = _limited_main(largest // 2, *resumed)
  assert run.returncode == 1, run.stderr
  assert 'Traceback' not in run.stderr
  lines = run.stderr.splitlines()[-1:]
  assert lines[0].startswith(
      f'error: cannot write checkpoint 3 to {checkpoints / "3"} (a file '
      'would exceed the size this process may write (ulimit -f): '), lines
  assert lines[0].endswith(
      f'so the earlier checkpoints ([1, 2]) are untouched; {room} in '
      f'{checkpoints}, then rerun the same command to resume'), lines
  assert int(restore_state(config, checkpoints).step) == 2

  config.train.num_steps = 4
  results = train.train_and_evaluate(config, str(workdir))
  assert results['iterations'] == 4
  assert int(restore_state(config, checkpoints).step) == 4


def test_fault_full_disk_for_the_demo_figure_keeps_the_old_one(
    finished_run, tmp_path):
  """The demo over a finished run, every file limited to 10 kB: one line
  naming the figure and its size; the old figure is intact."""
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  # Matplotlib's font cache is written before the limit applies (the
  # subprocess shares it), not by the limited process.
  assert font_manager.fontManager.ttflist
  config, base, _ = finished_run
  shutil.copytree(base / 'run', tmp_path / 'demo' / config.method)
  figure = tmp_path / 'demo.png'
  figure.write_bytes(b'the old figure')
  run = subprocess.run(
      [sys.executable, '-m', 'experiments.demo',
       '--config=tests/tiny_digits_config.py', f'--workdir={tmp_path / "demo"}',
       f'--methods={config.method}', f'--figure={figure}',
       '--compilation_cache=none'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300, preexec_fn=_limited_to(10_000))
  assert run.returncode == 1, run.stderr
  assert 'Traceback' not in run.stderr
  assert re.fullmatch(
      f'error: cannot write {re.escape(str(figure))} \\(a file would exceed '
      'the size this process may write \\(ulimit -f\\); it needs [0-9.]+ [kM]B'
      f'\\); the runs in {re.escape(str(tmp_path / "demo"))} are finished '
      'and kept: rerun the same command to draw it',
      run.stderr.splitlines()[-1]), run.stderr
  assert figure.read_bytes() == b'the old figure'


# ----------------------------------------------------------------------------
# 7. Files users hand over.


def test_fault_pickled_npz_is_refused_naming_the_file(tmp_path):
  path = tmp_path / 'weights.npz'
  np.savez(path, **{'model/x': np.array([{'code': 'here'}], dtype=object)})
  with pytest.raises(torch_state.ConversionError, match=(
      f'cannot read {path} as an .npz of arrays.*pickled entries are '
      'refused')):
    torch_state.load_torch_checkpoint(path)


def test_fault_missing_state_dict_entry_is_named_with_the_file(tmp_path,
                                                              finished_run):
  """experiments.evaluate on an .npz that lacks one entry of the model:
  non-zero, one line naming the file and the entry."""
  config, base, _ = finished_run
  from l2w_jax.training.learner import build_learner  # pylint: disable=g-import-not-at-top
  model = build_learner(config).model
  template = torch_state.variables_template(model, jnp.zeros((1, 32, 32, 3)))
  state = torch_state.flax_to_torch(jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), template))
  missing = sorted(state)[0]
  del state[missing]
  path = tmp_path / 'partial.npz'
  np.savez(path, **{f'model/{k}': v for k, v in state.items()})
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.evaluate',
       '--config=tests/tiny_digits_config.py', f'--torch_checkpoint={path}',
       f'--out={tmp_path / "eval"}', f'--config.dataset.data_dir={base / "data"}'],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=120)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: {path}: the state_dict does not match'), last
  module, leaf = missing.rsplit('.', 1)  # e.g. ...net.0 and weight
  assert f'missing: {module} [params/kernel]' in last and leaf == 'weight', (
      last)
