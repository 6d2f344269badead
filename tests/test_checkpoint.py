"""Asynchronous checkpoints and workdir paths: `save` returns before the
files are written, a save that fails in the background stops the run with
one CheckpointError naming the checkpoint, nothing saved is lost; a workdir
scheme that cannot be written stops the run before anything is built."""

import asyncio
import importlib.util
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from orbax.checkpoint._src.path import atomicity
import pytest

from l2w_jax import paths
from l2w_jax.training import divergence
from l2w_jax.training import train
from l2w_jax.training import workdir as workdir_lib
from l2w_jax.training.checkpoint import CheckpointError, Checkpointer
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.tiny import restore_state, tiny_train_config

CONFIG_FILE = PROJECT_ROOT / 'tests' / 'tiny_digits_config.py'
STATE = {'w': jnp.arange(6.0), 'count': jnp.int32(4)}


def _hold_renames(monkeypatch) -> threading.Event:
  """Makes orbax's last step of every local save (renaming the temporary
  directory into place) wait until the returned event is set."""
  release = threading.Event()
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    await asyncio.to_thread(release.wait, 60)
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize',
                      finalize)
  return release


def test_save_returns_before_the_checkpoint_is_written(tmp_path,
                                                       monkeypatch):
  """With the rename held, `save` returns and the checkpoint is not there
  yet; `latest_step` waits for it and then names it; it restores."""
  release = _hold_renames(monkeypatch)
  checkpointer = Checkpointer(str(tmp_path / 'checkpoints'))
  try:
    checkpointer.save(1, STATE, {'step': 1})
    assert not (tmp_path / 'checkpoints' / '1').exists()
    threading.Timer(0.5, release.set).start()
    assert checkpointer.latest_step() == 1  # waited for the save
    assert (tmp_path / 'checkpoints' / '1').is_dir()
    restored, meta = checkpointer.restore(STATE)
    assert meta == {'step': 1}
    np.testing.assert_array_equal(restored['w'], STATE['w'])
  finally:
    release.set()
    checkpointer.close()


def test_close_waits_for_the_save_in_flight(tmp_path, monkeypatch):
  release = _hold_renames(monkeypatch)
  checkpointer = Checkpointer(str(tmp_path / 'checkpoints'))
  checkpointer.save(1, STATE, {'step': 1})
  threading.Timer(0.5, release.set).start()
  checkpointer.close()
  assert (tmp_path / 'checkpoints' / '1').is_dir()


def test_a_save_failing_in_the_background_stops_the_run_in_one_line(
    tmp_path, monkeypatch, caplog):
  """Checkpoint 2's rename raises ENOSPC in orbax's background thread: the
  run stops with one CheckpointError naming checkpoint 2 and the way out
  (orbax's own traceback is not logged), and checkpoint 1 restores."""
  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self, *args, **kwargs):
    if f'{tmp_path}/run/checkpoints/2.' in str(self.get()):
      raise OSError(28, 'No space left on device')
    return await original(self, *args, **kwargs)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize',
                      finalize)
  config = tiny_train_config('sklearn_digits', num_steps=4)
  config.dataset.data_dir = str(tmp_path / 'data')
  config.train.checkpoint_every_steps = 1
  config.train.keep_checkpoints = 5
  with pytest.raises(CheckpointError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert message.startswith(
      f'cannot write checkpoint 2 to {tmp_path / "run" / "checkpoints" / "2"} '
      '(no space is left on the device: OSError: [Errno 28] No space left '
      'on device)'), message
  one_checkpoint = sum(p.stat().st_size for p in
                       (tmp_path / 'run' / 'checkpoints' / '1').rglob('*')
                       if p.is_file())
  assert message.endswith(
      'the earlier checkpoints ([1]) are untouched; free at least '
      f'{paths.megabytes(one_checkpoint)} (one checkpoint) in '
      f'{tmp_path / "run" / "checkpoints"}, then rerun the same command to '
      'resume'), message
  assert '\n' not in message
  assert not [r for r in caplog.records if 'background save' in
              r.getMessage() or 'Save Finalize' in r.getMessage()]
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize',
                      original)
  assert int(restore_state(config, tmp_path / 'run' / 'checkpoints').step) == 1


def test_the_state_is_checked_on_the_device(monkeypatch):
  """A finite state is never copied to the host to be checked; a NaN is
  still found and named."""
  config = tiny_train_config('sklearn_digits', num_steps=2)
  from l2w_jax.training.learner import build_learner, init_train_state  # pylint: disable=g-import-not-at-top
  state = init_train_state(build_learner(config), jax.random.PRNGKey(0),
                           (32, 32, 3))

  class NoCheckpoint:
    def latest_step(self):
      return None

  def no_host_copy(tree):
    raise AssertionError('the finite state was copied to the host')

  with monkeypatch.context() as patch:
    patch.setattr(jax, 'device_get', no_host_copy)
    divergence.check_state_finite(state, 3, NoCheckpoint())
  bad = state.replace(params=jax.tree_util.tree_map(
      lambda x: x.at[(0,) * x.ndim].set(np.nan), state.params))
  with pytest.raises(divergence.TrainingDiverged,
                     match=r'non-finite \(first: \.params'):
    divergence.check_state_finite(bad, 3, NoCheckpoint())


# ----------------------------------------------------------------------------
# Workdirs on filesystems this code cannot write.


@pytest.mark.parametrize('workdir', ['s3://bucket/run', 'foo://host/run'])
def test_an_unwritable_scheme_stops_before_anything_is_built(
    workdir, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a local `s3:` directory would appear here

  def built(*args, **kwargs):
    raise AssertionError('the model was built')

  monkeypatch.setattr(train, 'build_learner', built)
  config = tiny_train_config('sklearn_digits', num_steps=2)
  config.dataset.data_dir = str(tmp_path / 'data')
  scheme = workdir.split(':')[0]
  with pytest.raises(workdir_lib.WorkdirError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert message.startswith(f'cannot use the workdir {workdir}: the '
                            f'{scheme}:// scheme cannot be written'), message
  assert 'gs://bucket/path' in message and '\n' not in message
  assert not list(tmp_path.glob(f'{scheme}:*'))


def test_gs_without_gcs_support_is_refused_naming_what_to_install(
    monkeypatch):
  """gs:// needs GCS support: without TensorFlow's filesystem (EPATH_USE_TF
  off) gcsfs, and google-cloud-storage for orbax."""
  find_spec = importlib.util.find_spec
  monkeypatch.setenv('EPATH_USE_TF', 'false')
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (
      None if name == 'gcsfs' else find_spec(name, *a)))
  with pytest.raises(workdir_lib.WorkdirError, match=(
      r'^cannot use the workdir gs://b/run: gs:// needs gcsfs .*pip install '
      'gcsfs$')):
    workdir_lib.check_workdir('gs://b/run')
  monkeypatch.delenv('EPATH_USE_TF')
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: (
      None if name == 'google.cloud.storage' else find_spec(name, *a)))
  with pytest.raises(workdir_lib.WorkdirError, match=(
      'gs:// needs google-cloud-storage.*pip install google-cloud-storage$')):
    workdir_lib.check_workdir('gs://b/run')
  monkeypatch.setattr(importlib.util, 'find_spec', find_spec)
  workdir_lib.check_workdir('gs://b/run')  # installed here: accepted
  workdir_lib.check_workdir('relative/run')


def test_the_command_refuses_an_unwritable_scheme_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       f'--config={CONFIG_FILE}', '--workdir=s3://bucket/run',
       f'--config.dataset.data_dir={tmp_path / "data"}'], cwd=tmp_path,
      env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr
  assert out.stderr.splitlines()[-1].startswith(
      'error: cannot use the workdir s3://bucket/run: the s3:// scheme '
      'cannot be written'), out.stderr
  assert 'Traceback' not in out.stderr
  assert not list(tmp_path.glob('s3:*'))


def test_paths_of_urls_are_never_made_local():
  assert paths.absolute('gs://b/run/') == 'gs://b/run'
  assert paths.join('gs://b/run', 'checkpoints', '3') == \
      'gs://b/run/checkpoints/3'
  assert paths.split('gs://b/run/checkpoints/3') == ('gs://b/run/checkpoints',
                                                    '3')
  assert paths.absolute('run') == os.path.abspath('run')
