"""Input pipelines: splits, determinism, resumption, sharding, augmentation.

CIFAR and ImageNet run under `tfds.testing.mock_data` with a fake
`_as_dataset` that honours split slicing and serves images whose pixels name
the example (channel 0 and 1 encode its index, channel 2 is a spatial
pattern), so that a batch can be traced back to the examples in it. The
digits are the real ones, prepared into a temporary data_dir.
"""

import contextlib
import importlib
import math
import os

import chex
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from l2w_jax import data
from l2w_jax.data import augment
from l2w_jax.data import catalogue
from l2w_jax.data import digits
from l2w_jax.data import graded_digits
from l2w_jax.data import in_memory
from l2w_jax.data import sizes
from l2w_jax.data import splits
from l2w_jax.training import schedules

TEST_OFFSET = 50_000  # indices of test/validation examples start here


def make_config(name, *, batch_size=16, seed=0, last_batch='drop',
                protocol=None, threshold_images=0, **dataset):
  """A data-only config; MSDNet's protocol when a holdout is given."""
  num_classes = {'sklearn_digits': 10, 'graded_digits': 10, 'cifar10': 10, 'cifar100': 100,
                 'cifar100_lt': 100, 'imagenet2012': 1000}[name]
  config = ml_collections.ConfigDict()
  config.seed = seed
  config.dataset = ml_collections.ConfigDict(
      dict(name=name, num_classes=num_classes, **dataset))
  config.train = ml_collections.ConfigDict({'batch_size': batch_size,
                                            'last_batch': last_batch})
  config.eval = ml_collections.ConfigDict({
      'protocol': protocol or ('holdout' if dataset.get('holdout') else
                               'train'),
      'threshold_images': threshold_images})
  return config


@pytest.fixture(autouse=True)
def _fresh_cache():
  in_memory.clear_cache()
  yield
  in_memory.clear_cache()


# ----------------------------------------------------------------------------
# Fake images that name their example.


def pattern_channel(height, width):
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return ((y * 32 + x) * 37 % 251 + 1).astype(np.uint8)


def fake_images(indices, height=32, width=32):
  """uint8 (n, h, w, 3): channels 0/1 = index in base 255 (+1), 2 = pattern."""
  indices = np.asarray(indices)
  out = np.empty((len(indices), height, width, 3), np.uint8)
  out[..., 0] = (indices % 255 + 1)[:, None, None]
  out[..., 1] = (indices // 255 + 1)[:, None, None]
  out[..., 2] = pattern_channel(height, width)
  return out


def index_of(images):
  """Example indices of uint8 (n, h, w, 3) images, read at the centre pixel
  (never padding: a 32 px crop with padding 4 keeps the centre inside)."""
  h, w = images.shape[1] // 2, images.shape[2] // 2
  centre = images[:, h, w].astype(np.int64)
  return (centre[:, 0] - 1) + 255 * (centre[:, 1] - 1)


def to_uint8(images, mean, std):
  """Inverts ToTensor + Normalize exactly (the error is ~1e-5 grey levels);
  uint8 images (training batches) as they are."""
  if images.dtype == np.uint8:
    return images
  x = (images * np.asarray(std, np.float32) + np.asarray(mean, np.float32))
  return np.round(x * 255.0).astype(np.uint8)


@contextlib.contextmanager
def fake_tfds(sizes, label_fn, encoded=False, file_positions=None):
  """mock_data whose `_as_dataset` serves `sizes` examples per split.

  Honours split slicing ('train[8:]', tfds.split_for_jax_process); examples
  of split s have indices offset + [0, sizes[s]) (offset TEST_OFFSET for
  non-train splits) and labels label_fn(s, local_indices). With `encoded`,
  images are PNG bytes of varying size (ImageNet's JPEG feature read with
  SkipDecoding), else uint8 32x32x3. With `file_positions` (int (n,)),
  'train' examples carry CIFAR's 'id' feature, 'train_<file position>'.
  """
  split_infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[n],
                                           num_bytes=0)
                 for name, n in sizes.items()}

  def as_dataset_fn(self, split, decoders=None, read_config=None,
                    shuffle_files=False):
    del self, decoders, read_config, shuffle_files
    spec = (tfds.core.ReadInstruction.from_spec(split)
            if isinstance(split, str) else split)
    local, names = [], []
    for instruction in spec.to_absolute(split_infos):
      n = sizes[instruction.splitname]
      start = instruction.from_ or 0
      stop = n if instruction.to is None else instruction.to
      local.append(np.arange(start, stop))
      names += [instruction.splitname] * (stop - start)
    local = np.concatenate(local)
    offsets = np.array([0 if s == 'train' else TEST_OFFSET for s in names])
    names = np.array(names)
    labels = np.concatenate([label_fn(s, local[names == s])
                             for s in dict.fromkeys(names)])
    indices = local + offsets
    if encoded:
      images = [tf.io.encode_png(fake_images(
          [i], 24 + i % 17, 30 + i % 23)[0]).numpy() for i in indices]
      features = {'image': np.array(images, dtype=object),
                  'label': labels.astype(np.int64),
                  'file_name': np.array([f'{i}.JPEG' for i in indices])}
    else:
      features = {'image': fake_images(indices),
                  'label': labels.astype(np.int64)}
    if file_positions is not None:
      features['id'] = np.array([
          f'train_{file_positions[i]:05d}' if name == 'train' else
          f'test_{i:05d}' for i, name in zip(local, names)])
    return tf.data.Dataset.from_tensor_slices(features)

  with tfds.testing.mock_data(as_dataset_fn=as_dataset_fn):
    yield


def cifar_labels(num_classes):
  return lambda split, local: (local * 7 + (split != 'train')) % num_classes


@pytest.fixture
def cifar10():
  with fake_tfds({'train': 120, 'test': 30}, cifar_labels(10)):
    yield


@pytest.fixture
def imagenet():
  with fake_tfds({'train': 60, 'validation': 20}, cifar_labels(1000),
                 encoded=True):
    yield


def _prepared(tmp_path_factory, name: str) -> str:
  """A tmp data_dir in which the embedded dataset `name` is prepared (no
  download)."""
  path = str(tmp_path_factory.mktemp(f'tfds_{name}'))
  data.data_info(make_config(name, data_dir=path))
  return path


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory):
  """The real sklearn_digits, prepared once."""
  return _prepared(tmp_path_factory, 'sklearn_digits')


def all_batches(iterator):
  return [dict(batch) for batch in iterator]


def stack(batches, key):
  return np.concatenate([b[key] for b in batches])


# ----------------------------------------------------------------------------
# sklearn_digits: the builder and its splits.


def test_digits_splits_are_stratified_disjoint_and_complete():
  _, labels = digits.load_raw()
  parts = digits.split_indices(labels)
  sizes = {k: len(v) for k, v in parts.items()}
  assert sizes == {'train': 1257, 'validation': 180, 'test': 360}
  joined = np.concatenate(list(parts.values()))
  assert len(joined) == 1797 and len(np.unique(joined)) == 1797
  overall = np.bincount(labels, minlength=10) / len(labels)
  for name, indices in parts.items():
    share = np.bincount(labels[indices], minlength=10)
    # Stratified: each class within one image of its share of the split.
    np.testing.assert_array_less(np.abs(share - overall * len(indices)), 1.0,
                                 err_msg=name)
  # Fixed seed: the same split every time.
  np.testing.assert_array_equal(digits.split_indices(labels)['test'],
                                parts['test'])


def test_digits_builder_serves_the_upsampled_images(digits_dir):
  builder = tfds.builder('sklearn_digits', data_dir=digits_dir)
  assert builder.is_prepared() and str(builder.version) == '1.0.0'
  assert 'scikit-learn' in builder.info.description
  assert builder.info.features['label'].num_classes == 10
  info = data.data_info(make_config('sklearn_digits', data_dir=digits_dir,
                                    holdout=5000))  # holdout is ignored
  assert info == data.DataInfo('sklearn_digits', 10, (32, 32, 3), 1257, 180,
                               360, num_thresholds=1257)
  raw, labels = digits.load_raw()
  expected = digits.digit_images(raw)
  assert expected.shape == (1797, 32, 32, 3) and expected.dtype == np.uint8
  assert expected.max() == 255 and expected.min() == 0
  np.testing.assert_array_equal(expected[..., 0], expected[..., 2])
  test_idx = digits.split_indices(labels)['test']
  batches = all_batches(data.eval_batches(
      make_config('sklearn_digits', data_dir=digits_dir), 'test', 128))
  got = to_uint8(stack(batches, 'image')[stack(batches, 'mask')],
                 digits.MEAN, digits.STD)
  # tfds stores examples in its own order: compare as multisets.
  key = lambda images: sorted(x.tobytes() for x in images)
  assert key(got) == key(expected[test_idx])
  # The hard-coded normalisation constants are the train split's.
  train = expected[digits.split_indices(labels)['train']] / 255.0
  assert abs(train.mean() - digits.MEAN[0]) < 5e-5
  assert abs(train.std() - digits.STD[0]) < 5e-5


def test_digits_train_epoch(digits_dir):
  config = make_config('sklearn_digits', data_dir=digits_dir, batch_size=128)
  info = data.data_info(config)
  steps = data.steps_per_epoch(info, 128, 'drop')
  assert steps == 1257 // 128 == 9
  batches = all_batches(data.train_batches(config, epoch=0))
  assert len(batches) == steps
  for batch in batches:
    assert batch['image'].shape == (128, 32, 32, 3)
    assert batch['image'].dtype == np.uint8  # normalised on the device
    assert batch['label'].shape == (128,) and batch['label'].dtype == np.int32
  images = augment.to_float_normalized(stack(batches, 'image'), digits.MEAN,
                                       digits.STD).numpy()
  low = (0.0 - digits.MEAN[0]) / digits.STD[0]
  high = (1.0 - digits.MEAN[0]) / digits.STD[0]
  assert images.min() >= low - 1e-5 and images.max() <= high + 1e-5
  assert images.min() == pytest.approx(low, abs=1e-5)  # background and padding
  # Normalised with the train statistics: roughly zero mean and unit std.
  assert abs(images.mean()) < 0.15 and 0.85 < images.std() < 1.15
  assert set(np.unique(stack(batches, 'label'))) == set(range(10))
  again = all_batches(data.train_batches(config, epoch=0))
  chex.assert_trees_all_equal(batches, again)


def test_digits_holdout_is_the_validation_split(digits_dir):
  config = make_config('sklearn_digits', data_dir=digits_dir)
  holdout = all_batches(data.eval_batches(config, 'holdout', 64))
  labels = stack(holdout, 'label')[stack(holdout, 'mask')]
  assert len(labels) == 180
  np.testing.assert_array_equal(np.bincount(labels), [18] * 10)


# ----------------------------------------------------------------------------
# graded_digits: renderings of known severity, split by source digit.


def _clean_rendering(glyph):
  """The rendering at severity 0: the digit large, upright and centred."""
  size = graded_digits.SEVERITY.size[0]
  drawn = graded_digits._draw(glyph * (255.0 / 16.0), size, 0.0, (16.0, 16.0))  # pylint: disable=protected-access
  return np.clip(np.rint(drawn), 0, 255)


def test_graded_digits_renderings_are_fixed_and_graded():
  raw, labels = digits.load_raw()
  sources = digits.split_indices(labels)['validation'][:60]
  rendered = graded_digits.render_split(raw, labels, sources)
  n = 60 * graded_digits.VARIANTS
  assert rendered['image'].shape == (n, 32, 32, 3)
  assert rendered['image'].dtype == np.uint8
  np.testing.assert_array_equal(rendered['source'],
                                np.repeat(sources, graded_digits.VARIANTS))
  np.testing.assert_array_equal(rendered['label'], labels[rendered['source']])
  np.testing.assert_array_equal(rendered['variant'],
                                np.tile(np.arange(graded_digits.VARIANTS), 60))
  severity = rendered['severity']
  assert severity.min() >= 0 and severity.max() <= 1
  assert severity.min() < 0.1 and severity.max() > 0.9  # a graded mix
  # Fixed: the same renderings every time, whatever else is rendered.
  again = graded_digits.render_split(raw, labels, sources)
  chex.assert_trees_all_equal(rendered, again)
  # Graded: the further from the clean digit, the higher the severity.
  distance = np.array([
      np.abs(image[..., 0].astype(np.float64) - _clean_rendering(raw[i])).mean()
      for image, i in zip(rendered['image'], rendered['source'])])
  assert np.corrcoef(severity, distance)[0, 1] > 0.9
  easiest = int(np.argmin(severity))
  assert distance[easiest] < 0.1 * distance.max()


@pytest.fixture(scope='session')
def graded_dir(tmp_path_factory):
  """graded_digits, prepared once."""
  return _prepared(tmp_path_factory, 'graded_digits')


def test_graded_digits_builder_serves_its_splits(graded_dir):
  info = data.data_info(make_config('graded_digits', data_dir=graded_dir))
  assert info == data.DataInfo('graded_digits', 10, (32, 32, 3), 3771, 540,
                               1080, num_thresholds=3771)
  raw, labels = digits.load_raw()
  parts = digits.split_indices(labels)
  builder = tfds.builder('graded_digits', data_dir=graded_dir)
  stored = tfds.as_numpy(builder.as_dataset(split='test', batch_size=-1))
  expected = graded_digits.render_split(raw, labels, parts['test'])
  # Every split holds the renderings of its own sources, and nothing else.
  order = np.argsort(stored['source'] * graded_digits.VARIANTS +
                     stored['variant'])
  for key in ('image', 'label', 'severity', 'source', 'variant'):
    np.testing.assert_array_equal(stored[key][order], expected[key], key)
  batches = all_batches(data.eval_batches(
      make_config('graded_digits', data_dir=graded_dir), 'holdout', 270))
  holdout = stack(batches, 'label')[stack(batches, 'mask')]
  assert len(holdout) == 540
  np.testing.assert_array_equal(
      np.bincount(holdout), np.bincount(labels[parts['validation']]) *
      graded_digits.VARIANTS)
  # The hard-coded normalisation constants are the train split's.
  train = graded_digits.render_split(raw, labels, parts['train'])
  pixels = train['image'][..., 0] / 255.0
  assert abs(pixels.mean() - graded_digits.MEAN[0]) < 5e-5
  assert abs(pixels.std() - graded_digits.STD[0]) < 5e-5


# ----------------------------------------------------------------------------
# Training batches: determinism, resumption, epochs, processes.


def test_train_batches_are_deterministic_and_resumable(cifar10):
  config = make_config('cifar10', holdout=20, batch_size=16)
  info = data.data_info(config)
  assert (info.num_train, info.num_holdout, info.num_test) == (100, 20, 30)
  full = all_batches(data.train_batches(config, epoch=3))
  assert len(full) == data.steps_per_epoch(info, 16, 'drop') == 6
  again = all_batches(data.train_batches(config, epoch=3))
  tail = all_batches(data.train_batches(config, epoch=3, start_step=4))
  assert len(tail) == 2
  chex.assert_trees_all_equal(full, again)
  chex.assert_trees_all_equal(full[4:], tail)
  assert all_batches(data.train_batches(config, epoch=3, start_step=6)) == []
  # Each example at most once per epoch; the dropped remainder is 100 % 16.
  seen = index_of(to_uint8(stack(full, 'image'), catalogue.CIFAR10_MEAN,
                           catalogue.CIFAR10_STD))
  assert len(set(seen)) == len(seen) == 96
  other = all_batches(data.train_batches(config, epoch=4))
  other_seen = index_of(to_uint8(stack(other, 'image'), catalogue.CIFAR10_MEAN,
                                 catalogue.CIFAR10_STD))
  assert not np.array_equal(seen, other_seen)  # a new permutation
  assert not np.array_equal(full[0]['image'], other[0]['image'])
  reseeded = all_batches(data.train_batches(
      make_config('cifar10', holdout=20, batch_size=16, seed=1), epoch=3))
  assert not np.array_equal(full[0]['image'], reseeded[0]['image'])


def test_process_slices_are_disjoint_and_make_the_global_batch(cifar10):
  config = make_config('cifar10', holdout=20, batch_size=16)
  whole = all_batches(data.train_batches(config, epoch=1, start_step=2))
  parts = [all_batches(data.train_batches(config, epoch=1, start_step=2,
                                          process_index=p, process_count=4))
           for p in range(4)]
  assert all(len(p) == len(whole) == 4 for p in parts)
  for step, batch in enumerate(whole):
    local = [p[step] for p in parts]
    assert all(b['image'].shape == (4, 32, 32, 3) for b in local)
    np.testing.assert_array_equal(
        np.concatenate([b['image'] for b in local]), batch['image'])
    np.testing.assert_array_equal(
        np.concatenate([b['label'] for b in local]), batch['label'])
  with pytest.raises(ValueError, match='divisible'):
    data.train_batches(config, epoch=0, process_count=3)
  with pytest.raises(ValueError, match='start_step'):
    data.train_batches(config, epoch=0, start_step=7)


def test_holdout_is_fixed_and_disjoint_from_train(cifar10):
  def indices(config, split):
    batches = all_batches(data.eval_batches(config, split, 32))
    images = to_uint8(stack(batches, 'image')[stack(batches, 'mask')],
                      catalogue.CIFAR10_MEAN, catalogue.CIFAR10_STD)
    return index_of(images)

  config = make_config('cifar10', holdout=20)
  holdout, train = indices(config, 'holdout'), indices(config, 'train')
  assert len(holdout) == 20 and len(train) == 100
  assert sorted(np.concatenate([holdout, train])) == list(range(120))
  # A uniform draw, not the first or the last images.
  np.testing.assert_array_equal(
      holdout, np.sort(splits.holdout_split(np.arange(120), 20)[1]))
  assert not np.array_equal(holdout, np.arange(20))
  assert not np.array_equal(holdout, np.arange(100, 120))
  # Independent of config.seed: every run thresholds on the same images.
  reseeded = make_config('cifar10', holdout=20, seed=7)
  np.testing.assert_array_equal(indices(reseeded, 'holdout'), holdout)
  np.testing.assert_array_equal(
      indices(config, 'test'), TEST_OFFSET + np.arange(30))
  no_holdout = make_config('cifar10', holdout=0)
  assert data.data_info(no_holdout).num_holdout == 0
  with pytest.raises(ValueError, match='holdout'):
    data.eval_batches(no_holdout, 'holdout', 8)


def test_eval_batches_cover_every_example_once_with_masks(cifar10):
  config = make_config('cifar10', holdout=20)
  batches = all_batches(data.eval_batches(config, 'train', 32))
  assert len(batches) == math.ceil(100 / 32)
  for batch in batches:
    assert batch['image'].shape == (32, 32, 32, 3)
    assert batch['label'].shape == batch['mask'].shape == (32,)
    assert batch['mask'].dtype == bool
  mask = stack(batches, 'mask')
  np.testing.assert_array_equal(mask, np.arange(4 * 32) < 100)
  assert not stack(batches, 'image')[~mask].any()  # zero padding
  images = to_uint8(stack(batches, 'image')[mask], catalogue.CIFAR10_MEAN,
                    catalogue.CIFAR10_STD)
  seen = index_of(images)
  assert len(set(seen)) == 100
  # Unaugmented: exactly the stored images, labels alongside.
  np.testing.assert_array_equal(images, fake_images(seen))
  np.testing.assert_array_equal(stack(batches, 'label')[mask], (seen * 7) % 10)
  # Fixed order.
  again = all_batches(data.eval_batches(config, 'train', 32))
  np.testing.assert_array_equal(stack(again, 'image'), stack(batches, 'image'))


def test_augmented_eval_is_fixed_and_crops_every_example(cifar10):
  config = make_config('cifar10', holdout=20)
  first = all_batches(data.eval_batches(config, 'train', 40, augment=True))
  second = all_batches(data.eval_batches(config, 'train', 40, augment=True))
  np.testing.assert_array_equal(stack(first, 'image'), stack(second, 'image'))
  plain = all_batches(data.eval_batches(config, 'train', 40))
  mask = stack(first, 'mask')
  got = to_uint8(stack(first, 'image')[mask], catalogue.CIFAR10_MEAN,
                 catalogue.CIFAR10_STD)
  want = to_uint8(stack(plain, 'image')[mask], catalogue.CIFAR10_MEAN,
                  catalogue.CIFAR10_STD)
  np.testing.assert_array_equal(index_of(got), index_of(want))
  assert (got != want).any(axis=(1, 2, 3)).mean() > 0.8


def _joined(per_process):
  """Local eval batches of P processes -> the global batches (the rows of
  process p are [p * b, (p + 1) * b) of each)."""
  assert len({len(batches) for batches in per_process}) == 1
  return [{key: np.concatenate([batches[i][key] for batches in per_process])
           for key in per_process[0][i]}
          for i in range(len(per_process[0]))]


def _normalized(batches, mean, std):
  """uint8 eval batches -> float32 as the pipeline normalises them."""
  x = np.stack([b['image'] for b in batches]).astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@pytest.mark.parametrize('augment', [False, True])
@pytest.mark.parametrize('source', ['cifar10', 'imagenet'])
def test_eval_batches_split_over_processes_make_the_global_batches(
    request, source, augment):
  """Each process decodes only its rows; joined, they are one process's
  batches bit for bit (in memory and streaming, plain and augmented), a
  process past the end gets all-padding batches, and uint8 batches are the
  float32 ones before normalisation."""
  request.getfixturevalue(source)  # the fake dataset
  if source == 'cifar10':
    config, count, batch = make_config('cifar10', holdout=20), 100, 32
    mean, std = catalogue.CIFAR10_MEAN, catalogue.CIFAR10_STD
  else:
    config, count, batch = imagenet_config(), 50, 16
    mean, std = catalogue.IMAGENET_MEAN, catalogue.IMAGENET_STD
  whole = all_batches(data.eval_batches(config, 'train', batch,
                                        augment=augment))
  assert stack(whole, 'mask').sum() == count
  for processes in (2, 4):
    shares = [all_batches(data.eval_batches(
        config, 'train', batch, augment=augment, process_index=p,
        process_count=processes)) for p in range(processes)]
    assert shares[0][0]['image'].shape[0] == batch // processes
    chex.assert_trees_all_equal(_joined(shares), whole)
    # The last global batch ends inside it: the last process pads only.
    assert not shares[-1][-1]['mask'].any()
  as_bytes = all_batches(data.eval_batches(config, 'train', batch,
                                           augment=augment, as_bytes=True))
  assert as_bytes[0]['image'].dtype == np.uint8
  mask = np.stack([b['mask'] for b in whole])
  np.testing.assert_array_equal(_normalized(as_bytes, mean, std)[mask],
                                np.stack([b['image'] for b in whole])[mask])
  assert not np.stack([b['image'] for b in as_bytes])[~mask].any()
  with pytest.raises(ValueError, match='multiple of the 3 processes'):
    data.eval_batches(config, 'train', batch, process_count=3)


# ----------------------------------------------------------------------------
# Augmentation.


def all_crop_flips(image, padding=4):
  """Every RandomCrop(padding) + flip of one image: {(top, left, flip): out}."""
  h, w, _ = image.shape
  padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
  out = {}
  for top in range(2 * padding + 1):
    for left in range(2 * padding + 1):
      crop = padded[top:top + h, left:left + w]
      out[(top, left, 0)] = crop
      out[(top, left, 1)] = crop[:, ::-1]
  return out


def test_crop_flip_is_a_shift_and_mirror_within_the_padded_frame():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (6, 32, 32, 3), dtype=np.uint8)
  params = np.array([[0, 0, 0], [8, 8, 1], [4, 4, 0], [4, 4, 1], [1, 7, 0],
                     [6, 2, 1]], np.int32)
  got = augment.crop_flip(tf.constant(images), tf.constant(params), 4).numpy()
  for image, (top, left, flip), out in zip(images, params, got, strict=True):
    np.testing.assert_array_equal(out, all_crop_flips(image)[(top, left,
                                                              flip)])
  # (4, 4) is the identity; the padding is zeros.
  np.testing.assert_array_equal(got[2], images[2])
  np.testing.assert_array_equal(got[3], images[3][:, ::-1])
  assert not got[0][:4].any() and not got[0][:, :4].any()
  assert got[0][4:, 4:].all()


def test_crop_flip_params_are_uniform_and_position_keyed():
  seed = tf.constant([3, 4], tf.int64)
  params = augment.crop_flip_params(seed, 20000, 4, flip=True).numpy()
  assert params.dtype == np.int32 and params.shape == (20000, 3)
  for column in (0, 1):
    counts = np.bincount(params[:, column], minlength=9)
    assert len(counts) == 9 and counts.min() > 20000 / 9 * 0.9
  assert abs(params[:, 2].mean() - 0.5) < 0.02
  # A longer table starts with the same rows: the draw is counter based.
  longer = augment.crop_flip_params(seed, 30000, 4, flip=True).numpy()
  np.testing.assert_array_equal(longer[:20000], params)
  no_flip = augment.crop_flip_params(seed, 100, 4, flip=False).numpy()
  assert not no_flip[:, 2].any()


def test_train_images_are_crops_and_flips_of_their_examples(cifar10):
  config = make_config('cifar10', holdout=20, batch_size=32)
  batch = next(data.train_batches(config, epoch=0))
  images = to_uint8(batch['image'], catalogue.CIFAR10_MEAN,
                    catalogue.CIFAR10_STD)
  flips = []
  for image, index in zip(images, index_of(images), strict=True):
    source = fake_images([index])[0]
    matches = [key for key, out in all_crop_flips(source).items()
               if np.array_equal(out, image)]
    assert matches, f'example {index} is no crop/flip of its image'
    flips.append(matches[0][2])
  assert 0 < sum(flips) < len(flips)  # both mirrored and plain images
  # 'crop' (the digits' setting) never mirrors.
  crop_only = make_config('cifar10', holdout=20, batch_size=32, augment='crop')
  images = to_uint8(next(data.train_batches(crop_only, epoch=0))['image'],
                    catalogue.CIFAR10_MEAN, catalogue.CIFAR10_STD)
  for image, index in zip(images, index_of(images), strict=True):
    candidates = all_crop_flips(fake_images([index])[0])
    assert any(np.array_equal(candidates[(t, l, 0)], image)
               for t in range(9) for l in range(9))


def torchvision_window(height, width, areas, log_ratios, offsets,
                       scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """RandomResizedCrop.get_params with the random draws given."""
  del scale
  for area_fraction, log_ratio, (u_i, u_j) in zip(areas, log_ratios, offsets):
    target_area = height * width * area_fraction
    aspect = math.exp(log_ratio)
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return (int(u_i * (height - h + 1)), int(u_j * (width - w + 1)), h, w)
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return ((height - h) // 2, (width - w) // 2, h, w)


@pytest.mark.parametrize('height,width', [(300, 400), (500, 333), (64, 64),
                                          (40, 900), (900, 40), (1, 1000)])
def test_random_resized_crop_window_is_torchvisions(height, width):
  for k in range(20):
    seed = tf.constant([k, 11], tf.int64)
    got = augment.random_resized_crop_window(seed, height, width).numpy()
    # The same draws, replayed through torchvision's loop.
    area_seed, ratio_seed, offset_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    areas = tf.random.stateless_uniform([10], seed=area_seed, minval=0.08,
                                        maxval=1.0).numpy()
    log_ratios = tf.random.stateless_uniform(
        [10], seed=ratio_seed, minval=math.log(3 / 4),
        maxval=math.log(4 / 3)).numpy()
    offsets = tf.random.stateless_uniform([10, 2], seed=offset_seed).numpy()
    want = torchvision_window(height, width, areas.astype(np.float64),
                              log_ratios.astype(np.float64),
                              offsets.astype(np.float64))
    assert tuple(got) == want
    top, left, h, w = got
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width


def test_imagenet_eval_transform_matches_torchvision_geometry():
  image = tf.constant(fake_images([5], 300, 500)[0])
  resized = augment.resize_shorter_side(image, 256)
  assert resized.shape == (256, int(256 * 500 / 300), 3)  # (256, 426)
  tall = augment.resize_shorter_side(tf.zeros([500, 333, 3], tf.uint8), 256)
  assert tall.shape == (int(256 * 500 / 333), 256, 3)  # (384, 256)
  cropped = augment.imagenet_eval(image, 224, 256)
  assert cropped.shape == (224, 224, 3)
  # CenterCrop: top = round((256 - 224) / 2) = 16, left = round(202 / 2) = 101.
  np.testing.assert_array_equal(cropped.numpy(),
                                resized.numpy()[16:240, 101:325])
  # A constant channel stays constant through the bilinear resize.
  assert (cropped.numpy()[..., 0] == 6).all()


# ----------------------------------------------------------------------------
# The training protocol: what trains, how an epoch ends, where thresholds
# come from (docs/faithfulness.md, "Data protocol").


def paper_config(name):
  return importlib.import_module(f'configs.{name}').get_config()


def run_arithmetic(config, info, num_devices=1):
  """(iterations / epoch, iterations, meta steps in an epoch, images in the
  last batch) of `config` on `info`, as experiments.main computes them."""
  batch = config.train.batch_size
  steps = data.steps_per_epoch(info, batch, config.train.last_batch)
  total = schedules.total_iterations(config.train, steps)
  meta = sum(i % config.meta.interval == 0 for i in range(steps))
  last = data.last_batch_size(info.num_train, batch, config.train.last_batch,
                              num_devices)
  return steps, total, meta, last


def test_cifar100_default_is_l2w_dens_protocol():
  config = paper_config('cifar100')
  with fake_tfds({'train': 50_000, 'test': 10_000}, cifar_labels(100)):
    info = data.data_info(config)
  # Every training image trains, and every one sets the thresholds.
  assert (info.num_train, info.num_holdout, info.num_test,
          info.num_thresholds) == (50_000, 0, 10_000, 50_000)
  # No drop_last in main_cifar_DDP.py: 49 iterations, the last of 848.
  assert run_arithmetic(config, info) == (49, 14_700, 49, 848)
  assert config.train.last_batch == 'keep'
  with fake_tfds({'train': 50_000, 'test': 10_000}, cifar_labels(100)):
    dropped = data.data_info(make_config('cifar100', batch_size=1024))
  assert data.steps_per_epoch(dropped, 1024, 'drop') == 48


def test_imagenet_default_is_l2w_dens_protocol(monkeypatch):
  config = paper_config('imagenet')
  # ImageNet's metadata sizes, without making 1.3 million mock records.
  monkeypatch.setattr(sizes, 'split_size', lambda builder, split: {
      'train': 1_281_167, 'validation': 50_000}[split])
  with tfds.testing.mock_data(num_examples=1):
    info = data.data_info(config)
  assert (info.num_train, info.num_holdout, info.num_test,
          info.num_thresholds) == (1_281_167, 0, 50_000, 50_000)
  # 313 iterations an epoch, meta steps at 0, 100, 200, 300; on 8 devices
  # the last batch is DistributedSampler's over 8 GPUs: 3,215 images and
  # one repeated.
  assert run_arithmetic(config, info, num_devices=8) == (313, 31_300, 4,
                                                         3216)
  assert 1_281_167 - 312 * 4096 == 3215


class _Outputs:
  """Records which split `threshold_outputs` asks for."""

  def outputs(self, config, variables, split, augment=False):
    del config, variables
    return split, augment


@pytest.mark.parametrize('name, split, augmented', [
    ('cifar100', 'thresholds', True),     # L2W-DEN: the training loader
    ('imagenet', 'thresholds', True),     # eval_imagenet.py: 50,000 of it
    ('cifar100_lt', 'thresholds', True),
    ('cifar10', 'thresholds', True),
    ('l2w_imta_imagenet', 'holdout', True),  # built on IMTA's script
    ('ranet_cifar10', 'holdout', True),    # --use-valid, augmented
    ('boostnet_cifar100', 'holdout', True),
    ('imta_imagenet', 'holdout', True),
    ('digits', 'holdout', False),          # the fixed validation split
])
def test_each_config_searches_thresholds_as_its_original(name, split,
                                                         augmented):
  from l2w_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  config = paper_config(name)
  assert report.threshold_outputs(config, _Outputs(), None) == (split,
                                                                augmented)


def test_threshold_split_is_every_training_image_augmented(cifar10):
  config = make_config('cifar10', batch_size=16)
  info = data.data_info(config)
  assert (info.num_train, info.num_holdout, info.num_thresholds) == (120, 0,
                                                                     120)

  def images(split, augment):
    batches = all_batches(data.eval_batches(config, split, 32,
                                            augment=augment))
    return to_uint8(stack(batches, 'image')[stack(batches, 'mask')],
                    catalogue.CIFAR10_MEAN, catalogue.CIFAR10_STD)

  plain, augmented = images('thresholds', False), images('thresholds', True)
  np.testing.assert_array_equal(index_of(plain), np.arange(120))
  np.testing.assert_array_equal(index_of(augmented), np.arange(120))
  assert not np.array_equal(plain, augmented)
  np.testing.assert_array_equal(augmented, images('thresholds', True))


def test_threshold_images_are_a_fixed_random_subset(cifar10):
  config = make_config('cifar10', batch_size=16, threshold_images=30)
  assert data.data_info(config).num_thresholds == 30
  batches = all_batches(data.eval_batches(config, 'thresholds', 32))
  chosen = index_of(to_uint8(stack(batches, 'image')[stack(batches, 'mask')],
                             catalogue.CIFAR10_MEAN, catalogue.CIFAR10_STD))
  assert len(set(chosen)) == 30 and not np.array_equal(chosen, np.arange(30))
  np.testing.assert_array_equal(chosen,
                                splits.threshold_subset(np.arange(120), 30))
  reseeded = make_config('cifar10', batch_size=16, threshold_images=30,
                         seed=5)
  again = all_batches(data.eval_batches(reseeded, 'thresholds', 32))
  np.testing.assert_array_equal(stack(again, 'label'), stack(batches, 'label'))


def test_imagenet_threshold_images_are_a_fixed_random_subset(imagenet):
  config = make_config('imagenet2012', image_size=32, shuffle_buffer=16,
                       threshold_images=12)
  info = data.data_info(config)
  assert (info.num_train, info.num_holdout, info.num_thresholds) == (60, 0,
                                                                     12)
  found = []
  for _ in range(2):
    batches = all_batches(data.eval_batches(config, 'thresholds', 8))
    found.append(imagenet_indices(batches, stack(batches, 'mask')))
  np.testing.assert_array_equal(found[0], found[1])
  np.testing.assert_array_equal(found[0],
                                splits.threshold_subset(np.arange(60), 12))
  assert not np.array_equal(found[0], np.arange(12))


@pytest.mark.parametrize('fields, match', [
    (dict(holdout=20, protocol='train'), 'eval.protocol=train never uses'),
    (dict(holdout=0, protocol='holdout'), 'needs held-out images'),
    (dict(protocol='msdnet'), 'unknown protocol'),
    (dict(holdout=20, threshold_images=5), 'eval.threshold_images'),
    (dict(threshold_images=-1), 'eval.threshold_images'),
    (dict(last_batch='pad'), 'train.last_batch'),
])
def test_impossible_protocols_are_named(cifar10, fields, match):
  with pytest.raises(ValueError, match=match):
    data.data_info(make_config('cifar10', **fields))


def test_keep_last_batch_serves_every_image_once_padded_to_the_devices(
    cifar10):
  # 120 training images at 16: 7 full batches and 8 left.
  config = make_config('cifar10', batch_size=16, last_batch='keep')
  info = data.data_info(config)
  assert data.steps_per_epoch(info, 16, 'keep') == 8

  def seen(batches):
    return index_of(to_uint8(stack(batches, 'image'), catalogue.CIFAR10_MEAN,
                             catalogue.CIFAR10_STD))

  epoch = all_batches(data.train_batches(config, epoch=2))
  assert [len(b['label']) for b in epoch] == [16] * 7 + [8]
  assert sorted(seen(epoch)) == list(range(120))
  # On 8 devices the last batch is 16 (2 a device, for the two halves): the
  # 8 left, then the epoch's first 8 again, as DistributedSampler pads.
  padded = all_batches(data.train_batches(config, epoch=2, num_devices=8))
  assert [len(b['label']) for b in padded] == [16] * 8
  chex.assert_trees_all_equal(padded[:7], epoch[:7])
  np.testing.assert_array_equal(seen(padded[-1:])[:8], seen(epoch[-1:]))
  np.testing.assert_array_equal(seen(padded[-1:])[8:], seen(epoch[:1])[:8])
  # Two processes: each holds its half of the last batch.
  halves = [all_batches(data.train_batches(config, epoch=2, process_index=p,
                                           process_count=2, num_devices=2))
            for p in range(2)]
  assert [len(b['label']) for b in halves[0]] == [8] * 7 + [4]
  np.testing.assert_array_equal(
      np.concatenate([halves[0][-1]['label'], halves[1][-1]['label']]),
      epoch[-1]['label'])
  # Resuming at the partial batch serves it alone.
  tail = all_batches(data.train_batches(config, epoch=2, start_step=7))
  chex.assert_trees_all_equal(tail, epoch[7:])


# ----------------------------------------------------------------------------
# Long-tailed CIFAR-100.


def test_long_tail_counts_are_ldam_drws():
  counts = splits.long_tail_counts(100, 100)
  assert counts[0] == 500 and counts[-1] == 5
  assert np.all(np.diff(counts) <= 0)
  # LDAM-DRW's get_img_num_per_cls (imb_factor = 1 / factor), in Python
  # floats; the totals are the CIFAR-100-LT sizes papers report.
  for factor, total in ((100, 10_847), (50, 12_608), (10, 19_573)):
    expected = [int(500 * ((1 / factor) ** (c / (100 - 1.0))))
                for c in range(100)]
    np.testing.assert_array_equal(splits.long_tail_counts(100, factor),
                                  expected)
    assert sum(expected) == total


def ldam_subset(file_labels, imb_factor):
  """LDAM-DRW's IMBALANCECIFAR100 (imb_type 'exp', rand_number 0), written
  out as its code does it: file positions kept."""
  img_max = 500
  counts = [int(img_max * (imb_factor ** (c / (100 - 1.0))))
            for c in range(100)]
  np.random.seed(0)
  kept = []
  for the_class, the_img_num in zip(np.unique(file_labels), counts):
    idx = np.where(file_labels == the_class)[0]
    np.random.shuffle(idx)
    kept.append(idx[:the_img_num])
  return np.concatenate(kept)


@pytest.mark.parametrize('with_ids', [True, False])
def test_cifar100_lt_is_ldam_drws_subset_in_file_order(with_ids):
  rng = np.random.default_rng(0)
  file_labels = rng.permutation(np.repeat(np.arange(100), 500))
  # tfds holds the file's records shuffled: tfds position i is file record
  # file_positions[i] (without ids, tfds order stands for the file's).
  file_positions = (rng.permutation(50_000) if with_ids else
                    np.arange(50_000))
  labels = file_labels[file_positions]
  with fake_tfds({'train': 50_000, 'test': 100},
                 lambda split, local: labels[local] if split == 'train'
                 else local % 100,
                 file_positions=file_positions if with_ids else None):
    config = make_config('cifar100_lt', imbalance_factor=50, holdout=500,
                         batch_size=100)
    info = data.data_info(config)
    assert info.num_train + info.num_holdout == 12_608  # LDAM's factor 50
    assert (info.num_holdout, info.num_test) == (500, 100)
    kept = []
    for split in ('train', 'holdout'):
      batches = all_batches(data.eval_batches(config, split, 2000))
      mask = stack(batches, 'mask')
      images = to_uint8(stack(batches, 'image')[mask], catalogue.CIFAR100_MEAN,
                        catalogue.CIFAR100_STD)
      kept.append(index_of(images))
      np.testing.assert_array_equal(stack(batches, 'label')[mask],
                                    labels[kept[-1]])
    assert len(kept[0]) == info.num_train and len(kept[1]) == 500
    assert not set(kept[0]) & set(kept[1])
    union = np.sort(np.concatenate(kept))
    np.testing.assert_array_equal(np.sort(file_positions[union]),
                                  np.sort(ldam_subset(file_labels, 1 / 50)))
    assert len(all_batches(data.train_batches(config, epoch=0))) == (
        info.num_train // 100)


# ----------------------------------------------------------------------------
# ImageNet (streaming).


def imagenet_config(**kwargs):
  return make_config('imagenet2012', image_size=32, holdout=10,
                     shuffle_buffer=16, **kwargs)


def imagenet_indices(batches, mask=None):
  images = stack(batches, 'image')
  if mask is not None:
    images = images[mask]
  return index_of(to_uint8(images, catalogue.IMAGENET_MEAN,
                           catalogue.IMAGENET_STD))


def test_imagenet_train_is_deterministic_resumable_and_sharded(imagenet):
  config = imagenet_config(batch_size=8)
  info = data.data_info(config)
  assert (info.num_train, info.num_holdout, info.num_test) == (50, 10, 20)
  assert info.image_shape == (32, 32, 3)
  full = all_batches(data.train_batches(config, epoch=2))
  assert len(full) == 6
  assert full[0]['image'].shape == (8, 32, 32, 3)
  assert full[0]['image'].dtype == np.uint8
  again = all_batches(data.train_batches(config, epoch=2))
  tail = all_batches(data.train_batches(config, epoch=2, start_step=4))
  chex.assert_trees_all_equal(full, again)
  assert len(tail) == 2
  chex.assert_trees_all_equal(full[4:], tail)
  seen = imagenet_indices(full)
  assert len(set(seen)) == 48 and min(seen) >= 10  # never the holdout
  np.testing.assert_array_equal(stack(full, 'label'), (seen * 7) % 1000)
  other = all_batches(data.train_batches(config, epoch=3))
  assert not np.array_equal(imagenet_indices(other), seen)
  # Per process: each reads its own half of the records.
  halves = [all_batches(data.train_batches(config, epoch=2, process_index=p,
                                           process_count=2))
            for p in range(2)]
  assert [len(h) for h in halves] == [6, 6]
  assert halves[0][0]['image'].shape == (4, 32, 32, 3)
  seen_by = [set(imagenet_indices(h)) for h in halves]
  assert not seen_by[0] & seen_by[1]
  assert seen_by[0] <= set(range(10, 35)) and seen_by[1] <= set(range(35, 60))


def test_imagenet_eval_splits(imagenet):
  config = imagenet_config()
  found = {}
  for split, count in (('holdout', 10), ('train', 50), ('test', 20)):
    batches = all_batches(data.eval_batches(config, split, 16))
    mask = stack(batches, 'mask')
    assert mask.sum() == count and len(mask) == 16 * math.ceil(count / 16)
    found[split] = imagenet_indices(batches, mask)
  np.testing.assert_array_equal(found['holdout'], np.arange(10))
  np.testing.assert_array_equal(found['train'], np.arange(10, 60))
  np.testing.assert_array_equal(found['test'], TEST_OFFSET + np.arange(20))
  augmented = [all_batches(data.eval_batches(config, 'holdout', 16,
                                             augment=True)) for _ in range(2)]
  np.testing.assert_array_equal(stack(augmented[0], 'image'),
                                stack(augmented[1], 'image'))
  plain = all_batches(data.eval_batches(config, 'holdout', 16))
  assert not np.array_equal(stack(augmented[0], 'image'),
                            stack(plain, 'image'))


# ----------------------------------------------------------------------------
# Plain tfds.testing.mock_data, missing data, bad configs.


@pytest.mark.parametrize('name,image_size', [('cifar10', 32), ('cifar100', 16),
                                             ('imagenet2012', 64)])
def test_plain_mock_data_counts_as_prepared(name, image_size):
  config = make_config(name, image_size=image_size, holdout=8, batch_size=8)
  with tfds.testing.mock_data(num_examples=40):
    info = data.data_info(config)
    assert (info.num_train, info.num_holdout, info.num_test) == (32, 8, 40)
    batches = all_batches(data.train_batches(config, epoch=0))
    assert len(batches) == 4
    assert batches[0]['image'].shape == (8, image_size, image_size, 3)
    test = all_batches(data.eval_batches(config, 'test', 16))
    assert stack(test, 'mask').sum() == 40


def test_missing_cifar100_names_the_command_and_downloads_nothing(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  config = make_config('cifar100', data_dir=str(empty))
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.data_info(config)
  message = str(error.value)
  assert 'cifar100' in message and str(empty) in message
  assert ("tfds.builder('cifar100', data_dir='" + str(empty) +
          "').download_and_prepare()") in message
  assert 'data_dir' in message
  assert os.listdir(empty) == []  # nothing was fetched or written
  with pytest.raises(data.DatasetNotFoundError):
    data.train_batches(config, epoch=0)


def test_missing_imagenet_explains_the_manual_download(tmp_path):
  config = make_config('imagenet2012', data_dir=str(tmp_path), image_size=224)
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.data_info(config)
  message = str(error.value)
  for part in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
               os.path.join(str(tmp_path), 'downloads', 'manual'),
               'DownloadConfig(manual_dir='):
    assert part in message


@pytest.mark.parametrize('field,value,match', [
    ('name', 'mnist', 'dataset.name'),
    ('num_classes', 7, 'dataset.num_classes'),
    ('augment', 'imagenet', 'dataset.augment'),
    ('holdout', -1, 'dataset.holdout'),
])
def test_bad_dataset_fields_are_named(field, value, match):
  config = make_config('cifar10')
  config.dataset[field] = value
  with pytest.raises(ValueError, match=match):
    data.data_info(config)


def test_input_spec_needs_no_prepared_dataset(tmp_path):
  """What a served model takes, from the config alone: ImageNet's
  evaluation transform and constants, CIFAR's without a transform, a
  config's own mean/std; a missing dataset is no error here."""
  from configs import cifar100, imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config()
  config.dataset.data_dir = str(tmp_path / 'nothing_here')
  spec = data.input_spec(config)
  assert spec.image_shape == (224, 224, 3)
  assert spec.mean == (0.485, 0.456, 0.406)
  assert spec.std == (0.229, 0.224, 0.225)
  assert spec.eval_transform == ('resize the shorter side to 256, center '
                                 'crop 224')
  config = cifar100.get_config()
  config.dataset.mean, config.dataset.std = (0.5, 0.5, 0.5), (0.25, 0.25,
                                                               0.25)
  spec = data.input_spec(config)
  assert (spec.name, spec.image_shape, spec.eval_transform) == (
      'cifar100', (32, 32, 3), 'none')
  assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25)
