"""The ImageNet input path: cropped JPEG decoding, one pipeline for every
epoch (`data.train_stream`), the thread pool, the benchmark.

ImageNet runs on a real tfds `imagenet2012`, prepared here (4 shards, so that
the seeded file shuffle has something to shuffle) from fake
ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar archives of small JPEGs;
CIFAR under the `tfds.testing.mock_data` fake of tests/test_data.py.
"""

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile

import chex
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from l2w_jax import data
from l2w_jax.data import augment
from l2w_jax.data import in_memory
from l2w_jax.data import streaming
from l2w_jax.data.settings import settings_from_config
from l2w_jax.data.tfds_source import tf_data_options
from tests import test_data
from tests.conftest import PROJECT_ROOT, subprocess_env


@pytest.fixture(autouse=True)
def _fresh_cache():
  in_memory.clear_cache()
  yield
  in_memory.clear_cache()


# ----------------------------------------------------------------------------
# Synthetic images.


def photo(height, width, seed):
  """uint8 (height, width, 3): colour gradients that differ per channel (so
  that the chroma planes carry detail) plus noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  image = np.stack([
      128 + 90 * np.sin(x / (5 + 7 * c) + c) * np.cos(y / (4 + 5 * c) - c)
      for c in range(3)], axis=-1)
  image += rng.normal(0, 12, image.shape)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def pil_bytes(image, fmt='JPEG', mode='RGB', **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(image).convert(mode).save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def jpeg_variants(image):
  """The encodings a JPEG of ImageNet can have: {name: bytes}."""
  return {
      '4:2:0': pil_bytes(image, quality=90),  # PIL's (and ImageNet's) usual
      '4:2:2': pil_bytes(image, quality=90, subsampling=1),
      '4:4:4': pil_bytes(image, quality=90, subsampling=0),
      'progressive': pil_bytes(image, quality=90, progressive=True),
      'greyscale': pil_bytes(image, mode='L', quality=90),
      'cmyk': pil_bytes(image, mode='CMYK', quality=90),
      'tf': tf.io.encode_jpeg(image, quality=90).numpy(),
  }


# Both orientations, odd sizes, images narrower than one iMCU (16 px).
SIZES = [(375, 500), (500, 375), (333, 499), (101, 67), (37, 53), (17, 17),
         (16, 48), (1, 9), (9, 1)]


def edge_windows(height, width):
  """Crop windows (top, left, h, w) at the places a cropped decode could go
  wrong: image borders, iMCU boundaries (multiples of 8 and 16), one pixel
  wide."""
  windows = [(0, 0, height, width), (0, width - 1, height, 1),
             (height - 1, width - 1, 1, 1), (height // 2, 0, height -
                                              height // 2, 1)]
  if width > 3:  # a few pixels wide, at either edge
    windows += [(0, 0, height, 2), (0, 1, height, 1),
                (0, width - 2, height, 2), (0, width - 3, height, 1)]
  if width > 17:
    windows += [(0, 16, height, width - 16), (0, 8, height, 9),
                (0, 15, height, 2), (0, 16, height, 1)]
  if height > 17:
    windows += [(16, 0, height - 16, width), (15, 1, 2, width - 1)]
  return windows


def rrc_windows(height, width, seeds):
  return [tuple(augment.random_resized_crop_window(
      tf.constant([seed, 5], tf.int64), height, width).numpy())
          for seed in seeds]


@tf.function(input_signature=[tf.TensorSpec([], tf.string),
                              tf.TensorSpec([4], tf.int32)])
def _crops(encoded, window):
  """(decode_crop_jpeg, full decode then slice, plain decode_and_crop_jpeg)
  of one window."""
  top, left, height, width = tf.unstack(window)
  full = augment.decode_image(encoded)[top:top + height, left:left + width]
  plain = tf.io.decode_and_crop_jpeg(encoded, window, channels=3,
                                     dct_method='INTEGER_ACCURATE')
  return augment.decode_crop_jpeg(encoded, window), full, plain


def test_cropped_decode_gives_the_pixels_of_decode_then_crop():
  """`decode_crop_jpeg` equals the full decode, sliced, exactly: 9 sizes x 7
  encodings x (10 RandomResizedCrop windows + the edge cases)."""
  checked = 0
  for index, (height, width) in enumerate(SIZES):
    windows = edge_windows(height, width) + rrc_windows(height, width,
                                                        range(10))
    for name, encoded in jpeg_variants(photo(height, width, index)).items():
      for window in windows:
        got, want, _ = _crops(tf.constant(encoded),
                              tf.constant(window, tf.int32))
        assert got.shape == want.shape == window[2:] + (3,)
        np.testing.assert_array_equal(
            got.numpy(), want.numpy(),
            err_msg=f'{name} {height}x{width} window {window}')
        checked += 1
  assert checked > 1000


def test_plain_decode_and_crop_differs_only_in_the_edge_columns():
  """Why `decode_crop_jpeg` decodes one column more on each side.

  A plain `tf.io.decode_and_crop_jpeg` of the window is not the full decode's
  window: libjpeg's fancy upsampling of chroma subsampled 2:1 horizontally
  interpolates with the neighbouring chroma sample, which a cropped decode
  does not have at the window's edges. Measured (TensorFlow 2.21's
  libjpeg-turbo, quality 90, 20 RandomResizedCrop windows on each of 9
  photos from 1x9 to 500x375 px): 4:2:0 differs in 80 of 180 windows,
  0.12% of the pixels, by at most 7 grey levels; 4:2:2 in 81, 0.19%, at most
  15; 4:4:4, greyscale and CMYK never. Every differing pixel is in the
  window's last column, or in its first when the window starts on a 16 px
  (iMCU) boundary; rows never differ (jpeg_skip_scanlines keeps the vertical
  context). This checks that this is still where the differences are (a
  libjpeg that decoded crops exactly passes too), which is what makes the
  one-column margin sufficient.
  """
  differing = total = 0
  for index, (height, width) in enumerate(SIZES[:5]):
    windows = edge_windows(height, width) + rrc_windows(height, width,
                                                        range(10))
    for name, encoded in jpeg_variants(photo(height, width, index)).items():
      for window in windows:
        _, want, plain = _crops(tf.constant(encoded),
                                tf.constant(window, tf.int32))
        diff = np.abs(plain.numpy().astype(int) - want.numpy().astype(int))
        columns = np.flatnonzero(diff.max(axis=(0, 2)))
        assert set(columns) <= {0, window[3] - 1}, (name, window, columns)
        assert diff.max() <= 32, (name, window)
        if name in ('4:4:4', 'greyscale', 'cmyk'):
          assert diff.max() == 0, (name, window)
        differing += int((diff > 0).any(axis=-1).sum())
        total += window[2] * window[3]
  assert differing / total < 0.01


def test_train_transform_is_the_same_with_either_decode():
  """RandomResizedCrop + flip of the cropped decode equals that of the full
  decode, for JPEGs and for images that are not JPEGs (a PNG, a greyscale
  or RGBA PNG, a GIF: decoded whole)."""
  crop = tf.function(lambda e, s: augment.imagenet_train_encoded(e, s, 24,
                                                                 'crop'))
  full = tf.function(lambda e, s: augment.imagenet_train_encoded(e, s, 24,
                                                                 'full'))
  image = photo(61, 90, 3)
  encoded = dict(jpeg_variants(image))
  encoded['png'] = pil_bytes(image, 'PNG')
  encoded['png greyscale'] = pil_bytes(image, 'PNG', mode='L')
  encoded['png rgba'] = pil_bytes(image, 'PNG', mode='RGBA')
  encoded['gif'] = pil_bytes(image, 'GIF')
  for name, value in encoded.items():
    value = tf.constant(value)
    reference = augment.decode_image(value)
    for k in range(12):
      seed = tf.constant([k, 3], tf.int64)
      got = crop(value, seed).numpy()
      assert got.shape == (24, 24, 3) and got.dtype == np.uint8
      np.testing.assert_array_equal(got, full(value, seed).numpy(), name)
      np.testing.assert_array_equal(
          got, augment.imagenet_train(reference, seed, 24).numpy(), name)
  with pytest.raises(ValueError, match='jpeg_decode'):
    augment.imagenet_train_encoded(tf.constant(encoded['png']),
                                   tf.constant([0, 0], tf.int64), 24, 'fast')


def test_imagenet_transforms_are_the_originals_pil_transforms():
  """The training and evaluation transforms give, pixel for pixel, what
  torchvision's RandomResizedCrop + RandomHorizontalFlip and Resize(256) +
  CenterCrop(224) give on the PIL image of the original's loader
  (`Image.open(...).convert('RGB')`), for the same window and flip."""
  image = photo(123, 171, 5)
  for name, encoded in [('4:2:0', pil_bytes(image, quality=90)),
                        ('progressive', pil_bytes(image, quality=85,
                                                  progressive=True)),
                        ('png', pil_bytes(image, 'PNG'))]:
    loaded = Image.open(io.BytesIO(encoded)).convert('RGB')
    for k in range(8):
      seed = tf.constant([k, 11], tf.int64)
      crop_seed, flip_seed = tf.unstack(
          tf.random.experimental.stateless_split(seed, 2))
      top, left, h, w = (int(v) for v in augment.random_resized_crop_window(
          crop_seed, 123, 171))
      want = loaded.crop((left, top, left + w, top + h)).resize(
          (24, 24), Image.Resampling.BILINEAR)
      if float(tf.random.stateless_uniform([], seed=flip_seed)) < 0.5:
        want = want.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      got = augment.imagenet_train_encoded(tf.constant(encoded), seed, 24)
      np.testing.assert_array_equal(got.numpy(), np.asarray(want),
                                    f'{name} {k}')
    # Resize(40): the shorter side 40, the longer int(40 * 171 / 123) = 55;
    # CenterCrop(32): top round(4) = 4, left round(11.5) = 12.
    want = np.asarray(loaded.resize((55, 40), Image.Resampling.BILINEAR))
    got = augment.imagenet_eval(augment.decode_image(tf.constant(encoded)),
                                32, 40)
    np.testing.assert_array_equal(got.numpy(), want[4:36, 12:44], name)


# ----------------------------------------------------------------------------
# A real tfds imagenet2012, prepared from fake archives.

SYNSETS = ('n01440764', 'n01443537', 'n01739381', 'n02105855')
PER_CLASS = 12
# Files tfds re-encodes (imagenet2012_dataset_builder.CMYK_IMAGES and
# PNG_IMAGES): the raw archives hold them as CMYK JPEG and PNG.
CMYK_NAME = 'n01739381_1309.JPEG'
PNG_NAME = 'n02105855_2933.JPEG'


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def write_fake_archives(manual_dir):
  """ILSVRC2012_img_train.tar (a tar of one tar per synset) and
  ILSVRC2012_img_val.tar of small JPEGs of varied sizes, as image-net.org
  ships them, with one CMYK JPEG and one PNG where ImageNet has them."""
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'),
                    'w') as train:
    for c, synset in enumerate(SYNSETS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as members:
        for i in range(PER_CLASS):
          k = c * PER_CLASS + i
          image = photo(30 + k % 13, 30 + k % 17, k)
          name = f'{synset}_{i}.JPEG'
          payload = pil_bytes(image, quality=90)
          if synset == 'n01739381' and i == 0:
            name, payload = CMYK_NAME, pil_bytes(image, mode='CMYK')
          if synset == 'n02105855' and i == 0:
            name, payload = PNG_NAME, pil_bytes(image, 'PNG')
          _add(members, name, payload)
      _add(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'),
                    'w') as val:
    for i in range(8):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG',
           pil_bytes(photo(40, 50, 1000 + i), quality=90))


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  """A data_dir with imagenet2012 prepared from the fake archives."""
  root = tmp_path_factory.mktemp('fake_imagenet')
  write_fake_archives(str(root / 'manual'))
  tfds.disable_progress_bar()
  builder = tfds.builder('imagenet2012', data_dir=str(root / 'tfds'))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root / 'manual'), num_shards=4))
  return str(root / 'tfds')


def imagenet_config(data_dir, **kwargs):
  # 48 - 8 = 40 training images: 5 steps of 8.
  kwargs = {'batch_size': 8, **kwargs}
  return test_data.make_config('imagenet2012', image_size=16, holdout=8,
                               shuffle_buffer=16, data_dir=data_dir,
                               **kwargs)


def test_imagenet_holdout_is_a_hash_ordered_subset(imagenet_dir):
  """eval.protocol=holdout holds out ImageNet's first records in tfds order
  (docs/faithfulness.md): tfds writes them in the order of a hash of their
  file names, so the first 8 are spread over the classes, not the first
  files of the archive."""
  builder = tfds.builder('imagenet2012', data_dir=imagenet_dir)
  ds = builder.as_dataset(split='train[:8]', shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  names = [r['file_name'].decode() for r in tfds.as_numpy(ds)]
  archive_order = [f'{s}_{i}.JPEG' for s in SYNSETS for i in range(PER_CLASS)]
  assert names != archive_order[:8]
  assert len({name.split('_')[0] for name in names}) > 1


def test_tfds_imagenet_stores_only_rgb_jpegs(imagenet_dir):
  """tfds's imagenet2012 keeps the archives' JPEG bytes as they are, except
  the CMYK JPEGs and the PNG, which it re-encodes as RGB JPEG: every stored
  image is a JPEG, and both paths decode all of them."""
  builder = tfds.builder('imagenet2012', data_dir=imagenet_dir)
  assert builder.info.splits['train'].num_shards == 4
  ds = builder.as_dataset(split='train',
                          decoders={'image': tfds.decode.SkipDecoding()})
  names = []
  for example in ds:
    encoded = example['image']
    names.append(example['file_name'].numpy().decode())
    assert tf.io.is_jpeg(encoded)
    shape = tf.io.extract_jpeg_shape(encoded).numpy()
    assert shape[2] == 3, names[-1]  # RGB (YCbCr), never CMYK
  assert CMYK_NAME in names and PNG_NAME in names
  assert len(names) == len(SYNSETS) * PER_CLASS


def test_jpeg_decode_option_changes_nothing_but_speed(imagenet_dir):
  crop = imagenet_config(imagenet_dir)
  full = imagenet_config(imagenet_dir, jpeg_decode='full')
  # pylint: disable-next=protected-access
  assert settings_from_config(crop).jpeg_decode == 'crop'  # the default
  for epoch in (0, 1):
    chex.assert_trees_all_equal(
        test_data.all_batches(data.train_batches(crop, epoch=epoch)),
        test_data.all_batches(data.train_batches(full, epoch=epoch)))
  chex.assert_trees_all_equal(
      test_data.all_batches(data.eval_batches(crop, 'train', 16,
                                              augment=True)),
      test_data.all_batches(data.eval_batches(full, 'train', 16,
                                              augment=True)))
  with pytest.raises(ValueError, match='dataset.jpeg_decode'):
    data.data_info(imagenet_config(imagenet_dir, jpeg_decode='fast'))


# ----------------------------------------------------------------------------
# train_stream: the epochs' train_batches, one pipeline.


def same_batches(got, want):
  """Byte for byte, dtype and shape included."""
  assert len(got) == len(want)
  for step, (a, b) in enumerate(zip(got, want)):
    assert a.keys() == b.keys(), step
    for key in a:
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
      assert a[key].tobytes() == b[key].tobytes(), (step, key)


def epochs_concatenated(config, num_epochs, **kwargs):
  return [dict(batch) for epoch in range(num_epochs)
          for batch in data.train_batches(config, epoch=epoch, **kwargs)]


def stream_batches(config, start_step, count, **kwargs):
  stream = data.train_stream(config, start_step=start_step, **kwargs)
  batches = [dict(b) for b in itertools.islice(stream, count)]
  stream.close()
  return batches


def check_stream(config, steps, starts, **kwargs):
  """train_stream from each start equals the concatenated train_batches of 3
  epochs (`steps` each) from there."""
  want = epochs_concatenated(config, 3, **kwargs)
  assert len(want) == 3 * steps
  for start in starts:
    same_batches(stream_batches(config, start, 3 * steps - start, **kwargs),
                 want[start:])
  return want


@pytest.fixture
def cifar10():
  """tests/test_data.py's fake CIFAR-10: 120 training images."""
  with test_data.fake_tfds({'train': 120, 'test': 30},
                           test_data.cifar_labels(10)):
    yield


@pytest.mark.parametrize('augment_name', ['crop_flip', 'none'])
def test_in_memory_stream_is_the_epochs_concatenated(cifar10, augment_name):
  config = test_data.make_config('cifar10', holdout=20, batch_size=16,
                                 augment=augment_name)
  # 6 steps an epoch: the start, mid-epoch, exactly at the boundary, just
  # after it, and in the last epoch.
  check_stream(config, 6, (0, 3, 6, 7, 12))
  if augment_name == 'crop_flip':
    for process in range(2):
      check_stream(config, 6, (5,), process_index=process, process_count=2)



def test_in_memory_stream_keeps_the_last_batch(cifar10):
  # 100 training images at 16: 6 full batches and the last of 4 (8 on 4
  # devices, padded).
  config = test_data.make_config('cifar10', holdout=20, batch_size=16,
                                 last_batch='keep')
  want = check_stream(config, 7, (0, 6, 7, 13))
  assert [len(b['label']) for b in want[:7]] == [16] * 6 + [4]
  padded = check_stream(config, 7, (6, 8), num_devices=4)
  assert [len(b['label']) for b in padded[:7]] == [16] * 6 + [8]
  check_stream(config, 7, (6,), process_index=1, process_count=2,
               num_devices=4)


def test_stream_without_the_deprecated_interleave(cifar10, monkeypatch):
  """The fallback for a TensorFlow without
  tf.data.experimental.parallel_interleave gives the same batches."""
  monkeypatch.delattr(tf.data.experimental, 'parallel_interleave')
  config = test_data.make_config('cifar10', holdout=20, batch_size=16)
  check_stream(config, 6, (4,))


def test_streaming_stream_is_the_epochs_concatenated(imagenet_dir):
  config = imagenet_config(imagenet_dir)
  want = check_stream(config, 5, (0, 2, 5, 6, 11))
  # Each epoch reshuffles files and buffer: different orders, same images.
  labels = [np.concatenate([b['label'] for b in want[e * 5:(e + 1) * 5]])
            for e in range(3)]
  assert not np.array_equal(labels[0], labels[1])
  assert sorted(labels[0]) == sorted(labels[1]) == sorted(labels[2])
  for process in range(2):
    check_stream(config, 5, (7,), process_index=process, process_count=2)


def test_streaming_stream_keeps_the_last_batch(imagenet_dir):
  # 40 training images at 12: 3 full batches and the last of 4 (8 on 4
  # devices: the epoch's first 4 records read again).
  config = imagenet_config(imagenet_dir, batch_size=12, last_batch='keep')
  want = check_stream(config, 4, (0, 3, 4, 9))
  assert [len(b['label']) for b in want[:4]] == [12] * 3 + [4]
  padded = check_stream(config, 4, (3,), num_devices=4)
  assert [len(b['label']) for b in padded[:4]] == [12] * 3 + [8]
  np.testing.assert_array_equal(padded[3]['label'][:4], want[3]['label'])
  np.testing.assert_array_equal(padded[3]['label'][4:], want[0]['label'][:4])
  labels = np.concatenate([b['label'] for b in want[:4]])
  assert len(labels) == 40  # every training image once


def test_stream_builds_one_pipeline(imagenet_dir, monkeypatch):
  """Three epochs of train_stream build each epoch's dataset once (traced;
  tf.data then instantiates it per epoch); train_batches builds one per
  call."""
  calls = {'_streaming_epoch': 0, '_in_memory_epoch': 0, 'as_dataset': 0}
  for module, name in ((streaming, '_streaming_epoch'),
                       (in_memory, '_in_memory_epoch')):
    original = getattr(module, name)

    def counted(*args, _original=original, _name=name, **kwargs):
      calls[_name] += 1
      return _original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
  as_dataset = tfds.core.DatasetBuilder.as_dataset

  def counted_as_dataset(self, *args, **kwargs):
    calls['as_dataset'] += 1
    return as_dataset(self, *args, **kwargs)

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'as_dataset',
                      counted_as_dataset)
  config = imagenet_config(imagenet_dir)
  assert len(stream_batches(config, 0, 15)) == 15
  assert calls['_streaming_epoch'] == calls['as_dataset'] == 1
  epochs_concatenated(config, 3)
  assert calls['_streaming_epoch'] == calls['as_dataset'] == 4
  with test_data.fake_tfds({'train': 120, 'test': 30},
                           test_data.cifar_labels(10)):
    config = test_data.make_config('cifar10', holdout=20, batch_size=16)
    assert len(stream_batches(config, 0, 18)) == 18
    assert calls['_in_memory_epoch'] == 1


def test_stream_arguments_and_close(cifar10):
  config = test_data.make_config('cifar10', holdout=20, batch_size=16)
  with pytest.raises(ValueError, match='start_step'):
    data.train_stream(config, start_step=-1)
  with pytest.raises(ValueError, match='divisible'):
    data.train_stream(config, process_count=3)
  stream = data.train_stream(config, start_step=1000)  # epoch 166, no end
  batch = next(stream)
  assert batch['image'].shape == (16, 32, 32, 3)
  assert batch['image'].dtype == np.uint8
  stream.close()
  assert next(stream, None) is None


def test_stream_under_plain_mock_data():
  config = test_data.make_config('imagenet2012', image_size=24, holdout=8,
                                 batch_size=8)
  with tfds.testing.mock_data(num_examples=40):
    want = epochs_concatenated(config, 2)
    same_batches(stream_batches(config, 3, 5), want[3:])


_EXIT_SCRIPT = """
import time
from l2w_jax import data
from l2w_jax.data import splits
from tests import test_data

original = splits.epoch_batches

def slow(num, batch, seed, epoch, *args, **kwargs):
  if epoch >= 1:
    time.sleep(3.0)  # the next epoch is opening when the interpreter exits
  return original(num, batch, seed, epoch, *args, **kwargs)

splits.epoch_batches = slow
with test_data.fake_tfds({'train': 120, 'test': 30},
                         test_data.cifar_labels(10)):
  stream = data.train_stream(test_data.make_config('cifar10', holdout=20,
                                                   batch_size=16))
  next(stream)
print('read', flush=True)
"""


def test_process_exits_with_a_stream_open():
  """A stream left open at exit while tf.data runs one of its numpy
  functions: without `_close_open_streams` the interpreter waits for that
  thread forever (it hung every time); with it, it exits."""
  result = subprocess.run([sys.executable, '-c', _EXIT_SCRIPT],
                          cwd=PROJECT_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'read' in result.stdout


# ----------------------------------------------------------------------------
# Threads.


def test_default_threads_are_every_cpu_of_the_host(monkeypatch):
  config = test_data.make_config('cifar10')
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(96)),
                      raising=False)
  assert data.host_cpus() == 96
  settings = settings_from_config(config)
  assert settings.num_threads == 96  # no cap at 32
  options = tf_data_options(settings)
  assert options.threading.private_threadpool_size == 96
  config.dataset.num_threads = 3
  # pylint: disable-next=protected-access
  assert settings_from_config(config).num_threads == 3
  config.dataset.num_threads = -2
  with pytest.raises(ValueError, match='dataset.num_threads'):
    settings_from_config(config)
  monkeypatch.delattr(os, 'sched_getaffinity')
  monkeypatch.setattr(os, 'cpu_count', lambda: 5)
  assert data.host_cpus() == 5


# ----------------------------------------------------------------------------
# The benchmark.


def _benchmark(*flags_):
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.input_pipeline', '--threads=1',
       '--image_size=16', '--batch_size=2', '--repeats=1', *flags_],
      cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [l for l in result.stdout.splitlines() if l.startswith('{')]
  assert len(lines) == 1, result.stdout
  return json.loads(lines[0])


def test_benchmark_runs_on_a_few_tiny_images(tmp_path):
  figures = _benchmark('--num_images=4', '--width=40', '--height=30')
  for key in ('train_ms_per_image', 'train_before_ms_per_image',
              'train_full_decode_ms_per_image',
              'train_before_uint8_ms_per_image',
              'train_tf_resize_ms_per_image', 'eval_ms_per_image',
              'eval_before_ms_per_image'):
    assert figures[key] > 0, key
  assert figures['train_speedup'] == pytest.approx(
      figures['train_before_ms_per_image'] /
      figures['train_ms_per_image'], rel=0.01)
  assert figures['train_pixels_equal'] is True
  # TensorFlow's resize is within a grey level of PIL's, and not equal.
  assert figures['tf_resize_max_difference'] == 1
  assert 0 < figures['tf_resize_pixels_differing'] < 0.5
  assert figures['threads'] == 1 and figures['num_images'] == 4
  # A directory of files, a PNG among them.
  image = photo(30, 41, 0)
  (tmp_path / 'a.JPEG').write_bytes(pil_bytes(image, quality=90))
  (tmp_path / 'b.jpg').write_bytes(pil_bytes(image[::-1].copy(),
                                             quality=80))
  (tmp_path / 'c.png').write_bytes(pil_bytes(image, 'PNG'))
  (tmp_path / 'notes.txt').write_text('not an image')
  figures = _benchmark(f'--images_dir={tmp_path}')
  assert figures['num_images'] == 3 and figures['train_pixels_equal'] is True
