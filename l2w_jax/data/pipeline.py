"""Training and evaluation batches from tensorflow-datasets, via tf.data.

Two kinds of source:

* In memory (sklearn_digits, graded_digits, cifar10, cifar100, cifar100_lt):
  a tfds split
  is loaded once per process as uint8 numpy arrays; an epoch is a
  permutation of indices seeded by (config.seed, epoch), a perfect shuffle.
  Process p of P takes columns [p * B, (p + 1) * B) of every global batch, so
  the P local batches together are the global batch. The augmentation of the
  example at position i of the epoch (i = step * global_batch + column) is
  row i of a counter-based (Philox) stateless draw keyed by (seed, epoch): a
  function of (seed, epoch, i) alone, whichever process or start step asks.
* Streaming (imagenet2012): tfds reads the files in an order given by
  ReadConfig(shuffle_seed=f(seed, epoch)), then a seeded shuffle buffer; each
  example is decoded and augmented with the stateless seed (f(seed, epoch),
  position). Resuming at step k skips k * B records before decoding. Each
  process reads its own contiguous 1/P of the records
  (`tfds.split_for_jax_process`): with streaming a global batch is the union
  of P independently shuffled local batches, not a slice of one global
  permutation.

Both give bit-identical batches for the same (config, epoch) in any run, and
`start_step=k` yields exactly batches k, k+1, ... of the uninterrupted epoch.
Batches are numpy: {'image': float32 (B, H, W, 3) normalised, 'label': int32
(B,)}, plus 'mask': bool (B,) from `eval_batches`. H = W =
config.dataset.image_size; the 32x32 datasets are resized (bilinear) to it
after the augmentation when it is not 32, which only small test models ask.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from l2w_jax.data import augment
from l2w_jax.data import digits
from l2w_jax.data import graded_digits
from l2w_jax.data import splits

DATASETS = ('sklearn_digits', 'graded_digits', 'cifar10', 'cifar100', 'cifar100_lt',
            'imagenet2012')
AUGMENTS = ('crop_flip', 'crop', 'none', 'imagenet')
EVAL_SPLITS = ('holdout', 'test', 'train')

# Normalisation constants of the original (MSDNet's CIFAR values, torchvision's
# ImageNet ones); the embedded digits: see `digits.MEAN`,
# `graded_digits.MEAN`.
CIFAR10_MEAN = (0.4914, 0.4824, 0.4467)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_PADDING = 4  # RandomCrop(32, padding=4)
IMAGENET_EVAL_RATIO = 256 / 224  # Resize(256) before CenterCrop(224)


class DatasetNotFoundError(RuntimeError):
  """The dataset is not prepared where tfds looks; the message says how."""


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """Sizes of a dataset as the pipelines serve it.

  Attributes:
    name: config.dataset.name.
    num_classes: number of labels.
    image_shape: (H, W, 3) of the model input.
    num_train: images the training epochs draw from (all processes together),
      after removing the holdout and the long-tail subsampling.
    num_holdout: images of the threshold split (0 if none).
    num_test: images of the test split.
  """
  name: str
  num_classes: int
  image_shape: tuple
  num_train: int
  num_holdout: int
  num_test: int


@dataclasses.dataclass(frozen=True)
class _Kind:
  """What is fixed per dataset name."""
  tfds_name: str
  num_classes: int
  image_size: int  # stored size (in memory) or the usual model input (ImageNet)
  mean: tuple
  std: tuple
  augment: str
  holdout: int
  streaming: bool
  # Prepared here on first use, with its own fixed train / validation (the
  # holdout) / test splits: the datasets built from scikit-learn's digits.
  embedded: bool = False


_KINDS = {
    'sklearn_digits': _Kind(digits.NAME, 10, 32, digits.MEAN, digits.STD,
                            'crop', 0, False, embedded=True),
    'graded_digits': _Kind(graded_digits.NAME, 10, 32, graded_digits.MEAN,
                           graded_digits.STD, 'crop', 0, False,
                           embedded=True),
    'cifar10': _Kind('cifar10', 10, 32, CIFAR10_MEAN, CIFAR10_STD,
                     'crop_flip', 5000, False),
    'cifar100': _Kind('cifar100', 100, 32, CIFAR100_MEAN, CIFAR100_STD,
                      'crop_flip', 5000, False),
    # No holdout by default: at imbalance 100 the LT training set has 10,847
    # images, and 5,000 of them would be half of it.
    'cifar100_lt': _Kind('cifar100', 100, 32, CIFAR100_MEAN, CIFAR100_STD,
                         'crop_flip', 0, False),
    'imagenet2012': _Kind('imagenet2012', 1000, 224, IMAGENET_MEAN,
                          IMAGENET_STD, 'imagenet', 50000, True),
}


@dataclasses.dataclass(frozen=True)
class _Settings:
  """config.dataset (plus seed), resolved and checked."""
  name: str
  kind: _Kind
  data_dir: str | None
  manual_dir: str | None
  image_size: int
  holdout: int
  augment: str
  mean: tuple
  std: tuple
  imbalance_factor: float
  seed: int
  shuffle_buffer: int
  num_threads: int

  @property
  def image_shape(self) -> tuple:
    return (self.image_size, self.image_size, 3)


def _settings(config) -> _Settings:
  """Reads and validates config.dataset and config.seed."""
  dataset = config.dataset
  name = dataset.name
  if name not in _KINDS:
    raise ValueError(f'dataset.name: unknown dataset {name!r}; available: '
                     f'{DATASETS}')
  kind = _KINDS[name]
  num_classes = dataset.get('num_classes', kind.num_classes)
  if num_classes != kind.num_classes:
    raise ValueError(f'dataset.num_classes: {name} has {kind.num_classes} '
                     f'classes, got {num_classes}')
  image_size = int(dataset.get('image_size', kind.image_size))
  if image_size < 1:
    raise ValueError(f'dataset.image_size: must be >= 1, got {image_size}')
  augment_name = dataset.get('augment', None) or kind.augment
  allowed = (('imagenet', 'none') if kind.streaming else
             ('crop_flip', 'crop', 'none'))
  if augment_name not in allowed:
    raise ValueError(f'dataset.augment: {augment_name!r} does not apply to '
                     f'{name}; use one of {allowed}')
  holdout = dataset.get('holdout', None)
  holdout = kind.holdout if holdout is None else int(holdout)
  if holdout < 0:
    raise ValueError(f'dataset.holdout: must be >= 0, got {holdout}')
  seed = int(config.get('seed', 0))
  if seed < 0:
    raise ValueError(f'seed: must be >= 0, got {seed}')
  mean = tuple(float(m) for m in (dataset.get('mean', None) or kind.mean))
  std = tuple(float(s) for s in (dataset.get('std', None) or kind.std))
  if len(mean) != 3 or len(std) != 3:
    raise ValueError(f'dataset.mean / dataset.std: need 3 values each, got '
                     f'{mean} / {std}')
  data_dir = dataset.get('data_dir', None)
  return _Settings(
      name=name,
      kind=kind,
      data_dir=os.fspath(data_dir) if data_dir else None,
      manual_dir=dataset.get('manual_dir', None),
      image_size=image_size,
      holdout=0 if kind.embedded else holdout,
      augment=augment_name,
      mean=mean,
      std=std,
      imbalance_factor=float(dataset.get('imbalance_factor', 100)),
      seed=seed,
      shuffle_buffer=int(dataset.get('shuffle_buffer', 10000)),
      num_threads=int(
          dataset.get('num_threads', None) or min(32, os.cpu_count() or 1)))


# ----------------------------------------------------------------------------
# TensorFlow and tfds plumbing.


@functools.cache
def _configure_tensorflow() -> None:
  """Keeps TensorFlow off the accelerators, which belong to JAX.

  Only possible before TensorFlow initialises its devices; if something
  already did, TF keeps what it has (JAX preallocates its GPU memory first
  anyway).
  """
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass


# At import, before anything in the process can initialise TensorFlow.
_configure_tensorflow()


def _options(settings: _Settings) -> tf.data.Options:
  """Deterministic order; a private thread pool of `num_threads` threads and
  single-threaded ops, so that tf.data stays out of the way of JAX."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = settings.num_threads
  options.threading.max_intra_op_parallelism = 1
  return options


def _is_mocked() -> bool:
  """Whether `tfds.testing.mock_data` is active.

  The mock replaces `DatasetBuilder.download_and_prepare` by a no-op defined
  in `tensorflow_datasets.testing`; mocked datasets count as prepared.
  """
  function = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(function, '__module__', '').startswith(
      'tensorflow_datasets.testing')


def _prepare_command(settings: _Settings, data_dir: str,
                     manual_dir: str | None = None) -> str:
  tfds_name = settings.kind.tfds_name
  if manual_dir is None:
    call = f"tfds.builder('{tfds_name}', data_dir='{data_dir}')" \
           '.download_and_prepare()'
  else:
    call = (f"tfds.builder('{tfds_name}', data_dir='{data_dir}')"
            '.download_and_prepare(download_config=tfds.download.'
            f"DownloadConfig(manual_dir='{manual_dir}'))")
  return f'python -c "import tensorflow_datasets as tfds; {call}"'


def _not_found_message(settings: _Settings, builder) -> str:
  data_dir = os.fspath(builder.data_dir_root)
  tfds_name = settings.kind.tfds_name
  head = (f'dataset {settings.name!r}: the tfds dataset {tfds_name!r} is not '
          f'prepared in data_dir {data_dir} (no {builder.data_path}).')
  if tfds_name == 'imagenet2012':
    manual_dir = settings.manual_dir or os.path.join(data_dir, 'downloads',
                                                     'manual')
    return (f'{head} tfds needs the manual download: place '
            'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from '
            f'https://image-net.org) in the manual_dir {manual_dir} '
            '(config.dataset.manual_dir) and run\n  '
            f'{_prepare_command(settings, data_dir, manual_dir)}\n'
            'or set --config.dataset.data_dir to where it is prepared.')
  return (f'{head} It cannot be downloaded here: prepare on a machine with '
          f'network:\n  {_prepare_command(settings, data_dir)}\n'
          f'and copy the directory {os.path.join(data_dir, tfds_name)} here, '
          'or set --config.dataset.data_dir to where it is.')


def _builder(settings: _Settings) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder, or DatasetNotFoundError (nothing downloaded).

  The embedded datasets are prepared on first use (from scikit-learn's
  digits).
  """
  _configure_tensorflow()
  builder = tfds.builder(settings.kind.tfds_name, data_dir=settings.data_dir)
  if _is_mocked() or builder.is_prepared():
    return builder
  if settings.kind.embedded:
    print(f'preparing {settings.kind.tfds_name} in {builder.data_dir} (first '
          'use only; nothing is downloaded)', flush=True)
    tfds.disable_progress_bar()  # tfds' per-split bars would fill the screen
    builder.download_and_prepare()
    return builder
  raise DatasetNotFoundError(_not_found_message(settings, builder))


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in a whole tfds split, from the metadata."""
  if split in builder.info.splits:
    return builder.info.splits[split].num_examples
  # Only under tfds.testing.mock_data without metadata files, where split
  # sizes are unknown: the mock's cardinality (its num_examples).
  return int(builder.as_dataset(split=split).cardinality())


# ----------------------------------------------------------------------------
# Sizes.


def _sizes(settings: _Settings,
           builder: tfds.core.DatasetBuilder) -> tuple[int, int, int]:
  """(num_train, num_holdout, num_test) from metadata and the split rules."""
  name = settings.name
  if settings.kind.embedded:
    return (_split_size(builder, 'train'), _split_size(builder, 'validation'),
            _split_size(builder, 'test'))
  if name == 'imagenet2012':
    pool, test = _split_size(builder, 'train'), _split_size(
        builder, 'validation')
  elif name == 'cifar100_lt':
    # Needs the labels: the split is loaded (and cached for the pipelines).
    pool = len(_long_tail_pool(settings))
    test = _split_size(builder, 'test')
  else:
    pool, test = _split_size(builder, 'train'), _split_size(builder, 'test')
  if not 0 <= settings.holdout < pool:
    raise ValueError(f'dataset.holdout: must be in [0, {pool}) for {name}, '
                     f'got {settings.holdout}')
  return pool - settings.holdout, settings.holdout, test


def data_info(config) -> DataInfo:
  """Sizes and shapes from the metadata; raises DatasetNotFoundError first."""
  settings = _settings(config)
  num_train, num_holdout, num_test = _sizes(settings, _builder(settings))
  return DataInfo(
      name=settings.name,
      num_classes=settings.kind.num_classes,
      image_shape=settings.image_shape,
      num_train=num_train,
      num_holdout=num_holdout,
      num_test=num_test)


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What a model of the dataset takes: (H, W, 3) images normalised as
  (x / 255 - mean) / std per channel, after the evaluation transform
  (`eval_transform`: 'none', or ImageNet's resize of the shorter side to
  256 and center crop to 224)."""
  name: str
  image_shape: tuple
  mean: tuple
  std: tuple
  eval_transform: str


def input_spec(config) -> InputSpec:
  """The model input of config.dataset, from the config alone (the dataset
  need not be prepared)."""
  settings = _settings(config)
  transform = (f'resize the shorter side to '
               f'{int(round(settings.image_size * IMAGENET_EVAL_RATIO))}, '
               f'center crop {settings.image_size}'
               if settings.kind.streaming else 'none')
  return InputSpec(name=settings.name, image_shape=settings.image_shape,
                   mean=settings.mean, std=settings.std,
                   eval_transform=transform)


def steps_per_epoch(info: DataInfo, global_batch_size: int) -> int:
  """Full global batches in an epoch (the remainder is dropped)."""
  return info.num_train // global_batch_size


def _local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got '
                     f'{process_index}')
  if global_batch_size % process_count:
    raise ValueError(f'train.batch_size {global_batch_size} is not divisible '
                     f'by the {process_count} processes')
  return global_batch_size // process_count


# ----------------------------------------------------------------------------
# In-memory datasets.


@functools.lru_cache(maxsize=4)
def _load_split(tfds_name: str, data_dir: str | None,
                split: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole tfds split as uint8 (N, H, W, 3) images and int32 (N,) labels."""
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  ds = builder.as_dataset(
      split=split, shuffle_files=False,
      read_config=tfds.ReadConfig(try_autocache=False),
      decoders=tfds.decode.PartialDecoding({'image': True, 'label': True}))
  # Chunks rather than batch_size=-1, which sizes its single batch from the
  # metadata (unknown under mock_data).
  images, labels = [], []
  for chunk in tfds.as_numpy(ds.batch(4096)):
    images.append(chunk['image'])
    labels.append(chunk['label'])
  return (np.concatenate(images).astype(np.uint8),
          np.concatenate(labels).astype(np.int32))


def clear_cache() -> None:
  """Forgets the splits loaded in memory (e.g. between mocked datasets)."""
  _load_split.cache_clear()


def _in_memory_source(settings: _Settings,
                      role: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, indices) of 'train', 'holdout' or 'test'.

  `indices` select, in a fixed order, the examples of the role from the
  loaded tfds split.
  """
  name, tfds_name = settings.name, settings.kind.tfds_name
  if settings.kind.embedded:
    split = {'train': 'train', 'holdout': 'validation', 'test': 'test'}[role]
  else:
    split = 'test' if role == 'test' else 'train'
  images, labels = _load_split(tfds_name, settings.data_dir, split)
  indices = np.arange(len(labels))
  if settings.kind.embedded or role == 'test':
    return images, labels, indices
  if name == 'cifar100_lt':
    # The long-tailed subset first; the holdout (if any) is a fixed random
    # subset of it, by the same rule as for the balanced sets.
    indices = _long_tail_pool(settings)
  train, holdout = splits.holdout_split(indices, settings.holdout)
  return images, labels, (train if role == 'train' else holdout)


def _long_tail_pool(settings: _Settings) -> np.ndarray:
  """Indices into tfds cifar100 'train' of the long-tailed subset."""
  _, labels = _load_split(settings.kind.tfds_name, settings.data_dir, 'train')
  return splits.long_tail_indices(labels, settings.kind.num_classes,
                                  settings.imbalance_factor)


def _crop_params(settings: _Settings, seed: np.ndarray, num: int) -> tf.Tensor:
  """int32 (num, 3) crop/flip parameters; row i belongs to position i."""
  return augment.crop_flip_params(
      tf.constant(seed, tf.int64), num, CROP_PADDING,
      flip=settings.augment == 'crop_flip')


def _in_memory_batches(settings: _Settings, images: np.ndarray,
                       labels: np.ndarray, indices: np.ndarray,
                       params: tf.Tensor | None, batch_size: int,
                       drop_remainder: bool) -> tf.data.Dataset:
  """Batches of images[indices] (augmented by `params` rows when given)."""
  images_t = tf.constant(images)
  labels_t = tf.constant(labels)

  def make_batch(batch_indices, batch_params):
    batch_images = tf.gather(images_t, batch_indices)
    if batch_params is not None:
      batch_images = augment.crop_flip(batch_images, batch_params,
                                       CROP_PADDING)
    if settings.image_size != settings.kind.image_size:
      batch_images = augment.resize_bilinear(
          batch_images, settings.image_size, settings.image_size)
    return {
        'image': augment.to_float_normalized(batch_images, settings.mean,
                                             settings.std),
        'label': tf.gather(labels_t, batch_indices),
    }

  indices = indices.astype(np.int64)
  if params is None:
    ds = tf.data.Dataset.from_tensor_slices(indices)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(lambda i: make_batch(i, None),
                  num_parallel_calls=tf.data.AUTOTUNE)
  ds = tf.data.Dataset.from_tensor_slices((indices, params))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)


def _in_memory_train(settings: _Settings, epoch: int, start_step: int,
                     global_batch_size: int, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  images, labels, train = _in_memory_source(settings, 'train')
  local = _local_batch_size(global_batch_size, process_index, process_count)
  steps = _check_steps(len(train), global_batch_size, start_step)
  order, positions = splits.epoch_batches(
      len(train), global_batch_size, settings.seed, epoch, start_step,
      process_index, process_count)
  params = None
  if settings.augment != 'none':
    table = _crop_params(
        settings, splits.seed_words(settings.seed, epoch, splits.AUGMENT_TAG),
        steps * global_batch_size)
    params = tf.gather(table, positions)
  return _in_memory_batches(settings, images, labels, train[order], params,
                            local, drop_remainder=True)


def _check_steps(num_train: int, global_batch_size: int,
                 start_step: int) -> int:
  steps = num_train // global_batch_size
  if steps == 0:
    raise ValueError(f'train.batch_size {global_batch_size} is larger than '
                     f'the {num_train} training images')
  if not 0 <= start_step <= steps:
    raise ValueError(f'start_step must be in [0, {steps}], got {start_step}')
  return steps


# ----------------------------------------------------------------------------
# Streaming (ImageNet).


def _decode(encoded: tf.Tensor) -> tf.Tensor:
  # INTEGER_ACCURATE is libjpeg's ISLOW, what PIL decodes with: the same
  # pixels as the original's loader.
  return tf.io.decode_jpeg(encoded, channels=3, dct_method='INTEGER_ACCURATE')


def _streaming_preprocess(settings: _Settings, augment_key: np.ndarray | None,
                          stride: int = 1, offset: int = 0):
  """(position, example) -> {'image', 'label'}.

  With `augment_key`, train augmentation seeded by (augment_key, position *
  stride + offset); without, the evaluation transform.
  """
  size = settings.image_size
  resize = int(round(size * IMAGENET_EVAL_RATIO))
  key = None if augment_key is None else tf.constant(augment_key[0], tf.int64)

  def preprocess(position, example):
    image = _decode(example['image'])
    if key is None or settings.augment == 'none':
      image = augment.imagenet_eval(image, size, resize)
    else:
      seed = tf.stack([key, position * stride + offset])
      image = augment.imagenet_train(image, seed, size)
    image = tf.ensure_shape(image, settings.image_shape)
    return {
        'image': augment.to_float_normalized(image, settings.mean,
                                             settings.std),
        'label': tf.cast(example['label'], tf.int32),
    }

  return preprocess


def _streaming_train(settings: _Settings, epoch: int, start_step: int,
                     global_batch_size: int, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  builder = _builder(settings)
  num_train, _, _ = _sizes(settings, builder)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  steps = _check_steps(num_train, global_batch_size, start_step)
  split = tfds.split_for_jax_process(
      f'train[{settings.holdout}:]', process_index=process_index,
      process_count=process_count)
  file_seed = splits.seed_words(settings.seed, epoch, splits.FILE_SHUFFLE_TAG,
                                num=1)[0]
  buffer_seed = splits.seed_words(settings.seed, epoch,
                                  splits.BUFFER_SHUFFLE_TAG, num=1)[0]
  ds = builder.as_dataset(
      split=split, shuffle_files=True,
      read_config=tfds.ReadConfig(shuffle_seed=int(file_seed),
                                  try_autocache=False),
      decoders={'image': tfds.decode.SkipDecoding()})
  # An explicit op seed makes the buffer's order a function of the input order
  # (as long as nobody sets TF's global seed, which nothing here does).
  ds = ds.shuffle(settings.shuffle_buffer, seed=int(buffer_seed),
                  reshuffle_each_iteration=False)
  # Every process yields the same number of batches, whatever its share.
  ds = ds.take(steps * local).enumerate()
  ds = ds.skip(start_step * local)  # still encoded: skipping is cheap
  augment_key = splits.seed_words(settings.seed, epoch, splits.AUGMENT_TAG)
  ds = ds.map(
      _streaming_preprocess(settings, augment_key, stride=process_count,
                            offset=process_index),
      num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(local, drop_remainder=True)


def _streaming_eval(settings: _Settings, split: str, batch_size: int,
                    augment_key: np.ndarray | None) -> tf.data.Dataset:
  builder = _builder(settings)
  num_train, num_holdout, num_test = _sizes(settings, builder)
  tfds_split, count = {
      'train': (f'train[{settings.holdout}:]', num_train),
      'holdout': (f'train[:{settings.holdout}]', num_holdout),
      'test': ('validation', num_test),
  }[split]
  ds = builder.as_dataset(
      split=tfds_split, shuffle_files=False,
      read_config=tfds.ReadConfig(try_autocache=False),
      decoders={'image': tfds.decode.SkipDecoding()})
  # A no-op on real data; bounds mocked splits that ignore slicing.
  ds = ds.take(count).enumerate()
  ds = ds.map(_streaming_preprocess(settings, augment_key),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size)


# ----------------------------------------------------------------------------
# Public entry points.


def train_batches(config, *, epoch: int, start_step: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Augmented training batches of epoch `epoch`, from batch `start_step` on.

  Each batch is {'image': float32 (B, H, W, 3), 'label': int32 (B,)} with
  B = config.train.batch_size // process_count; only full batches. The same
  (config, epoch) gives the same batches in any run; process p of P gets its
  own part of every global batch (see the module docstring).
  """
  settings = _settings(config)
  if epoch < 0:
    raise ValueError(f'epoch must be >= 0, got {epoch}')
  global_batch_size = int(config.train.batch_size)
  make = _streaming_train if settings.kind.streaming else _in_memory_train
  if not settings.kind.streaming:
    _builder(settings)  # DatasetNotFoundError before loading anything
  ds = make(settings, epoch, start_step, global_batch_size, process_index,
            process_count)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(settings))
  return ds.as_numpy_iterator()


def _pad_batch(batch: dict, batch_size: int, image_shape: tuple) -> dict:
  """Pads a (possibly short) batch to `batch_size`; 'mask' marks real rows."""
  n = tf.shape(batch['label'])[0]
  pad = batch_size - n
  image = tf.pad(batch['image'], [[0, pad], [0, 0], [0, 0], [0, 0]])
  label = tf.pad(batch['label'], [[0, pad]])
  return {
      'image': tf.ensure_shape(image, (batch_size,) + tuple(image_shape)),
      'label': tf.ensure_shape(label, (batch_size,)),
      'mask': tf.range(batch_size) < n,
  }


def eval_batches(config, split: str, batch_size: int, *,
                 augment: bool = False) -> Iterator[dict]:
  """Every example of `split` exactly once, in a fixed order.

  Args:
    config: the experiment config.
    split: 'holdout' (the threshold split), 'test' or 'train' (the training
      images, without the holdout).
    batch_size: examples per batch; the last batch is padded with zeros.
    augment: the training augmentation with a fixed seed (derived from
      config.seed, the same in every call), for thresholds searched on the
      training set as the original does; otherwise none.

  Returns:
    Batches {'image': float32 (batch_size, H, W, 3), 'label': int32
    (batch_size,), 'mask': bool (batch_size,)}, False on padding rows.
  """
  settings = _settings(config)
  if split not in EVAL_SPLITS:
    raise ValueError(f'split must be one of {EVAL_SPLITS}, got {split!r}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  builder = _builder(settings)
  if split == 'holdout' and _sizes(settings, builder)[1] == 0:
    raise ValueError(f'{settings.name} has no holdout split '
                     '(config.dataset.holdout is 0)')
  augment_key = (splits.seed_words(settings.seed, splits.EVAL_AUGMENT_TAG)
                 if augment else None)
  if settings.kind.streaming:
    ds = _streaming_eval(settings, split, batch_size, augment_key)
  else:
    images, labels, indices = _in_memory_source(settings, split)
    params = None
    if augment_key is not None and settings.augment != 'none':
      params = _crop_params(settings, augment_key, len(indices))
    ds = _in_memory_batches(settings, images, labels, indices, params,
                            batch_size, drop_remainder=False)
  ds = ds.map(lambda b: _pad_batch(b, batch_size, settings.image_shape))
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(settings))
  return ds.as_numpy_iterator()
