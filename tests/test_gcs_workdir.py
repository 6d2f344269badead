"""A run whose workdir is on Google Cloud Storage (`--workdir=gs://...`).

The filesystem is `tests/fake_gcs.py`: an in-memory GCS behind an HTTPS
proxy on 127.0.0.1, started and stopped by the `gcs` fixture. The project
and every client under it run as on a TPU pod: TensorFlow's GCS filesystem
(epath, TensorBoard), TensorStore's `gcs` driver (orbax's arrays) and
google-cloud-storage (orbax's step listing and deletion) talk HTTPS to the
real Google endpoints with their default settings, authenticate with a
refresh token, and only the network under them is this server. So this
covers the project's gs:// code end to end: orbax's GCS commit protocol
(commit_success.txt instead of a rename), asynchronous saves, the
quarantine of a corrupt checkpoint, metrics, TensorBoard, results, the
figure and the exported artifact. What it does not cover: GCS's own
behaviour beyond the API subset served (consistency under concurrent
writers, throttling, retries after 5xx, hierarchical-namespace buckets),
several hosts, and real credentials.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from l2w_jax.training import resume, train
from tests.conftest import PROJECT_ROOT, subprocess_env
from tests.fake_gcs import FakeGcs
from tests.tiny import checkpointing_digits_config

pytestmark = pytest.mark.long

BUCKET = 'l2w-test'
CONFIG_FILE = PROJECT_ROOT / 'tests' / 'tiny_digits_config.py'


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The fake GCS, and this process's environment pointing every GCS client
  at it (undone afterwards)."""
  fake = FakeGcs(tmp_path_factory.mktemp('fake_gcs'), buckets=(BUCKET,))
  fake.start()
  patch = pytest.MonkeyPatch()
  for key, value in fake.env().items():
    patch.setenv(key, value)
  try:
    yield fake
  finally:
    patch.undo()
    fake.stop()
  assert not fake.unhandled, fake.unhandled


def _config(tmp_path, num_steps=4):
  return checkpointing_digits_config(tmp_path, num_steps)


def _names(gcs, prefix):
  return list(gcs.objects(BUCKET, prefix))


def _no_local_gs_directory(*roots):
  """Nothing was written to a local `gs:` directory (what os.makedirs makes
  of `gs://bucket/x`)."""
  for root in roots:
    assert not os.path.lexists(os.path.join(root, 'gs:')), root


def _child_env(gcs):
  env = subprocess_env()
  env.update(gcs.env())
  return env


def test_a_gcs_run_resumes_recovers_a_corrupt_checkpoint_and_exports(
    gcs, tmp_path, monkeypatch, capsys):
  """Interrupted at iteration 3, checkpoint 3's array files cut in half in
  the bucket, rerun: checkpoint 3 is moved to bad_checkpoints/ in the
  bucket, the run resumes from 2 and ends bit-identical to an
  uninterrupted local run; then the run is exported to the bucket and
  served from it. Everything lands in the bucket, nothing on local disk."""
  monkeypatch.chdir(tmp_path)  # a local `gs:` directory would appear here
  config = _config(tmp_path)
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  workdir = f'gs://{BUCKET}/run'

  assert train.train_and_evaluate(config, workdir, interrupt_at_step=3) == {
      'interrupted_at': 3}
  names = _names(gcs, 'run/')
  for step in (1, 2, 3):  # orbax's GCS commit marker: written last
    assert f'run/checkpoints/{step}/commit_success.txt' in names
  assert 'run/metrics.jsonl' in names
  assert any(n.startswith('run/tensorboard/events.out.tfevents') for n in
             names)
  assert not any(n.startswith('run/results.json') for n in names)
  rows = [json.loads(line) for line in gcs.objects(
      BUCKET, 'run/metrics.jsonl')['run/metrics.jsonl'].decode().splitlines()]
  assert [r['step'] for r in rows if 'step' in r] == [1, 2, 3]

  arrays = [n for n in _names(gcs, 'run/checkpoints/3/state/')
            if '/d/' in n]
  assert arrays
  for name in arrays:
    content = gcs.objects(BUCKET, name)[name]
    gcs.put(BUCKET, name, content[:len(content) // 2])
  capsys.readouterr()
  resumed = train.train_and_evaluate(config, workdir)
  output = capsys.readouterr().out
  assert 'checkpoint 3 cannot be read' in output, output
  assert f'moved it to {workdir}/{resume.BAD_CHECKPOINTS}/3-' in output
  assert f'resumed from {workdir}/checkpoints at iteration 2' in output
  assert resumed['params_sha256'] == whole['params_sha256']
  assert resumed['budgeted'] == whole['budgeted']
  names = _names(gcs, 'run/')
  moved = [n for n in names
           if n.startswith(f'run/{resume.BAD_CHECKPOINTS}/3-')]
  assert any(n.endswith('/commit_success.txt') for n in moved)  # kept whole
  for step in (1, 2, 3, 4):  # 3 and 4 written again by the resumed run
    assert f'run/checkpoints/{step}/commit_success.txt' in names
  stored = json.loads(gcs.objects(BUCKET, 'run/results.json')[
      'run/results.json'])
  assert stored['params_sha256'] == whole['params_sha256']
  assert gcs.objects(BUCKET, 'run/budgeted.png')['run/budgeted.png'][
      :8] == b'\x89PNG\r\n\x1a\n'

  # Rerun: a finished run is read back from the bucket, not retrained.
  again, seconds = train.finished_or_trained(config, workdir)
  assert seconds is None and again == stored

  out = subprocess.run(
      [sys.executable, '-m', 'experiments.export',
       f'--config={CONFIG_FILE}', f'--workdir={workdir}',
       f'--out=gs://{BUCKET}/model', '--config.train.num_steps=4',
       f'--config.dataset.data_dir={tmp_path / "data"}'],
      cwd=tmp_path, env=_child_env(gcs), capture_output=True, text=True,
      timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'artifact in gs://{BUCKET}/model' in out.stdout
  model = _names(gcs, 'model/')
  assert {'model/variables.msgpack', 'model/config.json',
          'model/serving.json'} <= set(model), model
  assert not any('.tmp' in n for n in _names(gcs, ''))  # staging moved
  from l2w_jax.serving import Predictor  # pylint: disable=g-import-not-at-top
  predictor = Predictor.load(f'gs://{BUCKET}/model')
  assert predictor.params_sha256 == whole['params_sha256']
  images = np.zeros((2,) + predictor.image_shape, np.float32)
  assert predictor(images, budget=39).labels.shape == (2,)
  _no_local_gs_directory(tmp_path, PROJECT_ROOT, os.getcwd())


def test_a_gcs_run_killed_while_saving_resumes(gcs, tmp_path, monkeypatch,
                                               capsys):
  """A run on GCS killed without warning (SIGKILL) a few iterations in,
  with saves in flight: the rerun resumes from the newest checkpoint
  whose commit marker is in the bucket and finishes."""
  monkeypatch.chdir(tmp_path)
  workdir = f'gs://{BUCKET}/killed'
  process = subprocess.Popen(
      [sys.executable, '-m', 'experiments.main',
       f'--config={CONFIG_FILE}', f'--workdir={workdir}',
       f'--config.dataset.data_dir={tmp_path / "data"}',
       '--config.train.num_steps=400', '--config.train.keep_checkpoints=5',
       '--config.train.checkpoint_every_steps=1'], cwd=tmp_path,
      env=_child_env(gcs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  try:
    for line in process.stdout:
      if line.startswith('step 4/'):
        process.send_signal(signal.SIGKILL)
        break
    output = process.communicate(timeout=300)[0]
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == -signal.SIGKILL, output
  committed = sorted(
      int(n.split('/')[2]) for n in _names(gcs, 'killed/checkpoints/')
      if n.count('/') == 3 and n.endswith('/commit_success.txt'))
  assert committed and max(committed) <= 4, committed
  config = _config(tmp_path, num_steps=6)
  capsys.readouterr()
  results = train.train_and_evaluate(config, workdir)
  output = capsys.readouterr().out
  assert f'resumed from {workdir}/checkpoints at iteration ' \
         f'{max(committed)}' in output, output
  assert results['iterations'] == 6
  assert 'killed/results.json' in _names(gcs, 'killed/')
  _no_local_gs_directory(tmp_path, PROJECT_ROOT)
