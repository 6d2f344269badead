"""Unreadable training records (a corrupt image, a truncated TFRecord file):
named in one line by default, left out and counted with
config.dataset.skip_corrupt, the order of every other record unchanged."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import digits as digits_config
from l2w_jax import data
from l2w_jax.data import in_memory
from tests.conftest import PROJECT_ROOT, subprocess_env

TRAIN_FILE = 'sklearn_digits-train.tfrecord-00000-of-00001'
BAD = 17  # the record whose image is broken


@pytest.fixture(autouse=True)
def _fresh_cache():
  in_memory.clear_cache()
  yield
  in_memory.clear_cache()


@pytest.fixture(scope='module')
def clean_dir(tmp_path_factory) -> pathlib.Path:
  """A data_dir with sklearn_digits prepared."""
  root = tmp_path_factory.mktemp('digits')
  tfds.builder('sklearn_digits', data_dir=str(root)).download_and_prepare()
  return root


def _copy(clean_dir, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
  """(data_dir, its training file): a copy of the prepared digits."""
  shutil.copytree(clean_dir, tmp_path / 'data')
  train_file, = (tmp_path / 'data').glob(f'sklearn_digits/*/{TRAIN_FILE}')
  return tmp_path / 'data', train_file


def break_image(train_file: pathlib.Path, record: int) -> None:
  """Rewrites the file with record `record`'s PNG bytes zeroed after the
  header (its CRC stays valid: only the decoder can tell)."""
  serialized = list(tf.data.TFRecordDataset(str(train_file))
                    .as_numpy_iterator())
  example = tf.train.Example.FromString(serialized[record])
  image = example.features.feature['image'].bytes_list.value
  image[0] = image[0][:40] + bytes(len(image[0]) - 40)
  serialized[record] = example.SerializeToString()
  with tf.io.TFRecordWriter(str(train_file)) as writer:
    for item in serialized:
      writer.write(item)


def truncate(train_file: pathlib.Path, num_bytes: int = 100) -> None:
  """Cuts the file's last `num_bytes` bytes off: its last record is
  partial."""
  with open(train_file, 'r+b') as f:
    f.truncate(os.path.getsize(train_file) - num_bytes)


def _config(data_dir, skip=False, batch_size=64):
  config = digits_config.get_config()
  config.dataset.data_dir = str(data_dir)
  config.dataset.skip_corrupt = skip
  config.dataset.augment = 'none'  # so that a record's pixels identify it
  config.train.batch_size = batch_size
  config.train.last_batch = 'keep'  # every record in every epoch
  return config


def _epoch(config, epoch=0) -> tuple[np.ndarray, np.ndarray]:
  """The images and labels of an epoch's batches, one after the other."""
  batches = list(data.train_batches(config, epoch=epoch))
  return (np.concatenate([b['image'] for b in batches]),
          np.concatenate([b['label'] for b in batches]))


@pytest.mark.parametrize('fault', ['image', 'truncated'])
def test_an_unreadable_record_stops_naming_file_and_record(
    clean_dir, tmp_path, fault):
  data_dir, train_file = _copy(clean_dir, tmp_path)
  if fault == 'image':
    break_image(train_file, BAD)
  else:
    truncate(train_file)
  with pytest.raises(data.CorruptRecordError) as raised:
    next(data.train_batches(_config(data_dir), epoch=0))
  message = str(raised.value)
  record = BAD if fault == 'image' else 1256  # the last of 1,257
  why = ('it does not decode: Invalid PNG' if fault == 'image' else
         'the file ends before it: truncated')
  assert f'record {record} of {train_file} ({why}' in message, message
  assert '--config.dataset.skip_corrupt=True' in message
  assert '\n' not in message


@pytest.mark.parametrize('fault', ['image', 'truncated'])
def test_skipped_records_are_counted_and_the_others_keep_their_order(
    clean_dir, tmp_path, fault):
  """Every epoch is the clean dataset's epoch with the unreadable record
  taken out: the same images in the same order (batches shift by one
  after it)."""
  data_dir, train_file = _copy(clean_dir, tmp_path)
  if fault == 'image':
    break_image(train_file, BAD)
  else:
    truncate(train_file)
  bad_position = BAD if fault == 'image' else 1256
  clean_images = in_memory._load_split(  # pylint: disable=protected-access
      'sklearn_digits', str(clean_dir), 'train')[0]
  config = _config(data_dir, skip=True)
  info = data.data_info(config)
  assert info.num_train == 1256
  assert len(info.skipped) == 1 and str(train_file) in info.skipped[0]
  for epoch in (0, 1):
    in_memory.clear_cache()
    clean, clean_labels = _epoch(_config(clean_dir), epoch)
    in_memory.clear_cache()
    skipped, skipped_labels = _epoch(config, epoch)
    assert len(clean) == 1257 and len(skipped) == 1256
    kept = ~np.all(clean == clean_images[bad_position], axis=(1, 2, 3))
    assert kept.sum() == 1256
    np.testing.assert_array_equal(skipped, clean[kept])
    np.testing.assert_array_equal(skipped_labels, clean_labels[kept])


def test_a_dataset_changed_since_the_start_is_named(clean_dir, tmp_path):
  data_dir, train_file = _copy(clean_dir, tmp_path)
  config = _config(data_dir)
  data.data_info(config)  # the run opens the dataset: its files are noted
  truncate(train_file, 100)
  with pytest.raises(data.CorruptRecordError) as raised:
    next(data.train_batches(config, epoch=0))
  size = os.path.getsize(train_file)
  assert (f'files in {train_file.parent} changed since this process '
          f'started: {TRAIN_FILE} ({size + 100} -> {size} bytes)'
          in str(raised.value)), str(raised.value)


def _main(workdir, data_dir, *args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.main',
       '--config=tests/tiny_digits_config.py', f'--workdir={workdir}',
       f'--config.dataset.data_dir={data_dir}', *args], cwd=PROJECT_ROOT,
      env=subprocess_env(), capture_output=True, text=True, timeout=600)


def test_a_run_stops_in_one_line_and_trains_with_skip_corrupt(
    clean_dir, tmp_path):
  data_dir, train_file = _copy(clean_dir, tmp_path)
  break_image(train_file, BAD)
  out = _main(tmp_path / 'run', data_dir)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith(
      f"error: dataset 'sklearn_digits': a record cannot be read: record "
      f'{BAD} of {train_file}'), out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  # The advice works on the same workdir.
  out = _main(tmp_path / 'run', data_dir, '--config.dataset.skip_corrupt=True')
  assert out.returncode == 0, out.stderr[-3000:]
  assert (f'dataset.skip_corrupt: left out 1 unreadable record: record '
          f'{BAD} of {train_file}') in out.stdout
  results = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert results['skipped_records']['count'] == 1
  rows = [json.loads(line) for line in
          (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['data/skipped_records'] for r in rows
          if 'data/skipped_records' in r] == [1, 1, 1]  # 3 iterations
  assert f'record {BAD} of {train_file}' in (
      results['skipped_records']['records'][0])


# ----------------------------------------------------------------------------
# Streaming (ImageNet): found as the pipeline reaches them.


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory) -> pathlib.Path:
  """A data_dir with imagenet2012 prepared from the fake archives (48
  training images in 4 shards)."""
  from tests import test_input_pipeline  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('fake_imagenet')
  test_input_pipeline.write_fake_archives(str(root / 'manual'))
  tfds.disable_progress_bar()
  tfds.builder('imagenet2012', data_dir=str(root / 'tfds')).download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(root / 'manual'), num_shards=4))
  return root / 'tfds'


IMAGENET_SHARD = 'imagenet2012-train.tfrecord-00002-of-00004'


def _imagenet_copy(imagenet_dir, tmp_path):
  shutil.copytree(imagenet_dir, tmp_path / 'tfds')
  shard, = (tmp_path / 'tfds').glob(f'imagenet2012/*/{IMAGENET_SHARD}')
  return tmp_path / 'tfds', shard


def break_jpeg(shard: pathlib.Path, record: int) -> bytes:
  """Zeroes record `record`'s JPEG after its first 40 bytes; returns the
  original JPEG."""
  serialized = list(tf.data.TFRecordDataset(str(shard)).as_numpy_iterator())
  example = tf.train.Example.FromString(serialized[record])
  image = example.features.feature['image'].bytes_list.value
  original = image[0]
  image[0] = original[:40] + bytes(len(original) - 40)
  serialized[record] = example.SerializeToString()
  with tf.io.TFRecordWriter(str(shard)) as writer:
    for item in serialized:
      writer.write(item)
  return original


def _imagenet_config(data_dir, skip=False):
  config = _config(data_dir, skip=skip, batch_size=8)
  config.dataset.name = 'imagenet2012'
  config.dataset.num_classes = 1000
  config.dataset.image_size = 16
  config.dataset.shuffle_buffer = 16
  config.train.last_batch = 'drop'  # 40 training images: 5 batches of 8
  config.eval.protocol = 'holdout'
  config.dataset.holdout = 8
  return config


def _batches(stream, count):
  batches = [next(stream) for _ in range(count)]
  stream.close()
  return (np.concatenate([b['image'] for b in batches]),
          np.concatenate([b['label'] for b in batches]))


def test_streaming_stops_naming_the_record_it_cannot_decode(imagenet_dir,
                                                             tmp_path):
  data_dir, shard = _imagenet_copy(imagenet_dir, tmp_path)
  break_jpeg(shard, 3)
  stream = data.train_stream(_imagenet_config(data_dir))
  with pytest.raises(data.CorruptRecordError) as raised:
    _batches(stream, 10)  # two epochs: the record is met in the first
  message = str(raised.value)
  assert f'record 3 of {shard} (it does not decode' in message, message
  assert '--config.dataset.skip_corrupt=True' in message


def test_streaming_skip_keeps_the_order_and_a_resume_leaves_it_out(
    imagenet_dir, tmp_path):
  """With skip_corrupt the stream is the clean one without the record (the
  epoch's last place takes its first record again, so every process keeps
  its count); a stream resumed with the ids `on_skip` reported gives the
  same batches."""
  from l2w_jax.data import streaming  # pylint: disable=g-import-not-at-top
  data_dir, shard = _imagenet_copy(imagenet_dir, tmp_path)
  original = break_jpeg(shard, 3)
  clean, clean_labels = _batches(
      data.train_stream(_imagenet_config(imagenet_dir)), 10)
  reported = []
  config = _imagenet_config(data_dir, skip=True)
  skipped, skipped_labels = _batches(
      data.train_stream(config, on_skip=lambda bad, ids: reported.append(
          ([b.describe() for b in bad], ids))), 10)
  # Met once: left out of the later epochs from their start.
  (described, ids), = reported
  assert ids == [f'{IMAGENET_SHARD}__3']
  assert described[0].startswith(f'record 3 of {shard} (it does not decode')
  settings = data.pipeline.settings_from_config(config)
  image = streaming._imagenet_image(  # pylint: disable=protected-access
      settings, tf.constant(original), None).numpy()
  for epoch in range(2):
    part = slice(40 * epoch, 40 * (epoch + 1))
    kept = ~np.all(clean[part] == image, axis=(1, 2, 3))
    assert kept.sum() == 39
    np.testing.assert_array_equal(skipped[part][:39], clean[part][kept])
    np.testing.assert_array_equal(skipped_labels[part][:39],
                                  clean_labels[part][kept])
    np.testing.assert_array_equal(skipped[part][39], skipped[part][0])
  resumed, resumed_labels = _batches(
      data.train_stream(config, start_step=3, skip_ids=tuple(ids)), 7)
  np.testing.assert_array_equal(resumed, skipped[24:])
  np.testing.assert_array_equal(resumed_labels, skipped_labels[24:])


def test_streaming_truncated_file_is_named_and_not_skipped(imagenet_dir,
                                                           tmp_path):
  data_dir, shard = _imagenet_copy(imagenet_dir, tmp_path)
  records_in_shard = sum(1 for _ in tf.data.TFRecordDataset(str(shard)))
  truncate(shard)
  stream = data.train_stream(_imagenet_config(data_dir, skip=True))
  with pytest.raises(data.CorruptRecordError) as raised:
    _batches(stream, 10)
  message = str(raised.value)
  assert (f'record {records_in_shard - 1} of {shard} (the file ends before '
          'it: truncated)') in message, message
  assert 'cannot step over a truncated file' in message


def test_a_resumed_streaming_run_leaves_out_what_the_first_found(
    imagenet_dir, tmp_path):
  """Found in epoch 0, the record is written to the workdir; a run stopped
  in epoch 1 resumes leaving it out from the epoch's start, and ends with
  the uninterrupted run's parameters; results.json counts it."""
  from l2w_jax.training import train  # pylint: disable=g-import-not-at-top
  from tests.tiny import tiny_train_config  # pylint: disable=g-import-not-at-top
  data_dir, shard = _imagenet_copy(imagenet_dir, tmp_path)
  break_jpeg(shard, 3)
  config = tiny_train_config('imagenet2012', num_steps=10)  # two epochs
  config.dataset.data_dir = str(data_dir)
  config.dataset.skip_corrupt = True
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  assert train.train_and_evaluate(config, str(tmp_path / 'split'),
                                  interrupt_at_step=7) == {'interrupted_at': 7}
  entries = json.loads((tmp_path / 'split' / 'skipped_records.0.json')
                       .read_text())
  assert [e['id'] for e in entries] == [f'{IMAGENET_SHARD}__3']
  resumed = train.train_and_evaluate(config, str(tmp_path / 'split'))
  assert resumed['params_sha256'] == whole['params_sha256']
  for results in (whole, resumed):
    assert results['skipped_records']['count'] == 1
    assert results['skipped_records']['records'][0].startswith(
        f'record 3 of {shard} (it does not decode')
