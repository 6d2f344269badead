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
`train_batches` builds one epoch's pipeline; `train_stream` chains every
epoch from a global step on in one pipeline, batch for batch the same.
Batches are numpy: {'image', 'label': int32 (B,)}, plus 'mask': bool (B,)
from `eval_batches`. Training images are uint8 (B, H, W, 3), normalised on
the devices by the training step (a quarter of float32's bytes over the
host-device link, and less work here); evaluation images are float32,
normalised as ToTensor + Normalize, or uint8 with `as_bytes` (the training
loop's sharded evaluation, where each process also decodes only its rows
of every global batch). H = W =
config.dataset.image_size; the 32x32 datasets are resized (bilinear) to it
after the augmentation when it is not 32, which only small test models ask.

ImageNet's training images are decoded only in their RandomResizedCrop
window (config.dataset.jpeg_decode = 'crop', the default; 'full' decodes
whole images first, with the same pixels: see `augment.decode_crop_jpeg`).
tf.data runs on a private pool of config.dataset.num_threads threads, by
default every CPU the process may use (`host_cpus`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import os
from typing import Iterator
import weakref

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from l2w_jax.data import augment
from l2w_jax.data import digits
from l2w_jax.data import graded_digits
from l2w_jax.data import splits

# pylint: disable=g-direct-tensorflow-import,g-import-not-at-top
try:  # Private; it only silences a deprecation warning (`_chain_epochs`).
  from tensorflow.python.util import deprecation as _tf_deprecation
  _silence_deprecation = _tf_deprecation.silence
except (ImportError, AttributeError):
  _silence_deprecation = contextlib.nullcontext
# pylint: enable=g-direct-tensorflow-import,g-import-not-at-top

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
  jpeg_decode: str

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
  num_threads = int(dataset.get('num_threads', None) or host_cpus())
  if num_threads < 1:
    raise ValueError(f'dataset.num_threads: must be >= 1, got {num_threads}')
  jpeg_decode = dataset.get('jpeg_decode', None) or 'crop'
  if jpeg_decode not in augment.JPEG_DECODES:
    raise ValueError(f'dataset.jpeg_decode: must be one of '
                     f'{augment.JPEG_DECODES}, got {jpeg_decode!r}')
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
      num_threads=num_threads,
      jpeg_decode=jpeg_decode)


def host_cpus() -> int:
  """The CPUs this process may run on: the default `dataset.num_threads`.

  The affinity mask where the OS has one (a container, `taskset` or a batch
  scheduler may grant fewer CPUs than the machine has), else
  `os.cpu_count()`. Not capped: a TPU host's 100-odd cores all decode JPEGs,
  and the private pool's threads only run while there is work.
  """
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except (AttributeError, OSError):  # no sched_getaffinity (macOS)
    return os.cpu_count() or 1


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


def _crop_params(settings: _Settings, seed, num: int) -> tf.Tensor:
  """int32 (num, 3) crop/flip parameters; row i belongs to position i.

  `seed`: int64 (2,), numpy or a tensor computed in the pipeline.
  """
  return augment.crop_flip_params(
      tf.convert_to_tensor(seed, tf.int64), num, CROP_PADDING,
      flip=settings.augment == 'crop_flip')


def _in_memory_batch_fn(settings: _Settings, images: np.ndarray,
                        labels: np.ndarray, normalize: bool = True):
  """(indices[, params]) -> {'image': (B, H, W, 3), 'label': int32 (B,)}:
  gathers the batch from the split held in memory, augments it when
  `params` (int32 (B, 3), see `augment.crop_flip_params`) are given,
  resizes it to config.dataset.image_size if that differs; normalised to
  float32 with `normalize`, else uint8."""
  images_t = tf.constant(images)
  labels_t = tf.constant(labels)

  def make_batch(batch_indices, batch_params=None):
    batch_images = tf.gather(images_t, batch_indices)
    if batch_params is not None:
      batch_images = augment.crop_flip(batch_images, batch_params,
                                       CROP_PADDING)
    if settings.image_size != settings.kind.image_size:
      batch_images = augment.resize_bilinear(
          batch_images, settings.image_size, settings.image_size)
    if normalize:
      batch_images = augment.to_float_normalized(batch_images, settings.mean,
                                                 settings.std)
    return {'image': batch_images,
            'label': tf.gather(labels_t, batch_indices)}

  return make_batch


def _in_memory_batches(settings: _Settings, images: np.ndarray,
                       labels: np.ndarray, indices: np.ndarray,
                       params: tf.Tensor | None, batch_size: int,
                       drop_remainder: bool,
                       normalize: bool = True) -> tf.data.Dataset:
  """Batches of images[indices] (augmented by `params` rows when given)."""
  make_batch = _in_memory_batch_fn(settings, images, labels, normalize)
  indices = indices.astype(np.int64)
  if params is None:
    ds = tf.data.Dataset.from_tensor_slices(indices)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.map(lambda i: make_batch(i, None),
                  num_parallel_calls=tf.data.AUTOTUNE)
  ds = tf.data.Dataset.from_tensor_slices((indices, params))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)


def _in_memory_epoch(settings: _Settings, order, positions, augment_seed,
                     table_size: int, local: int) -> tf.data.Dataset:
  """One epoch of a process's training batches, as indices (and crop
  parameters), before the images are gathered.

  Args:
    settings: the dataset settings.
    order: int64 (n,), the examples (indices into the loaded split) in the
      order this process visits them, n a multiple of `local`.
    positions: int64 (n,), their positions in the uninterrupted global epoch,
      the keys of their augmentation.
    augment_seed: int64 (2,), the epoch's augmentation seed.
    table_size: positions in the global epoch (steps * global batch).
    local: this process's batch size.

  The arrays are numpy for `train_batches` and tensors computed inside the
  pipeline for `train_stream`: the same ops either way, so the same batches.

  Returns:
    Batches of int64 (local,) indices, or of (indices, int32 (local, 3)
    params) when the epoch is augmented.
  """
  if settings.augment == 'none':
    ds = tf.data.Dataset.from_tensor_slices(order)
  else:
    # The table is counter based (Philox): row i is a function of
    # (augment_seed, i), so gathering the rows of `positions` gives each
    # example the crop it has in the uninterrupted epoch.
    table = _crop_params(settings, augment_seed, table_size)
    ds = tf.data.Dataset.from_tensor_slices(
        (order, tf.gather(table, positions)))
  return ds.batch(local, drop_remainder=True)


def _in_memory_train(settings: _Settings, epoch: int, start_step: int,
                     global_batch_size: int, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  images, labels, train = _in_memory_source(settings, 'train')
  local = _local_batch_size(global_batch_size, process_index, process_count)
  steps = _check_steps(len(train), global_batch_size, start_step)
  order, positions = splits.epoch_batches(
      len(train), global_batch_size, settings.seed, epoch, start_step,
      process_index, process_count)
  ds = _in_memory_epoch(
      settings, train[order].astype(np.int64), positions,
      splits.seed_words(settings.seed, epoch, splits.AUGMENT_TAG),
      steps * global_batch_size, local)
  return ds.map(_in_memory_batch_fn(settings, images, labels,
                                    normalize=False),
                num_parallel_calls=tf.data.AUTOTUNE)


def _in_memory_stream(settings: _Settings, start_step: int,
                      global_batch_size: int, process_index: int,
                      process_count: int) -> tf.data.Dataset:
  """`_in_memory_train` of every epoch from `start_step` on, one pipeline.

  Each epoch's permutation is numpy's (`splits.epoch_batches`), so it is
  computed by a numpy_function when the pipeline reaches the epoch (a
  permutation of at most 50,000 indices: well under a millisecond).
  """
  images, labels, train = _in_memory_source(settings, 'train')
  local = _local_batch_size(global_batch_size, process_index, process_count)
  steps = _check_steps(len(train), global_batch_size, 0)

  def epoch_arrays(epoch, start):
    epoch, start = int(epoch), int(start)
    order, positions = splits.epoch_batches(
        len(train), global_batch_size, settings.seed, epoch, start,
        process_index, process_count)
    return (train[order].astype(np.int64), positions.astype(np.int64),
            splits.seed_words(settings.seed, epoch, splits.AUGMENT_TAG))

  def make_epoch(epoch, start):
    order, positions, seed = tf.numpy_function(
        epoch_arrays, [epoch, start], (tf.int64, tf.int64, tf.int64),
        stateful=False)
    order.set_shape([None])
    positions.set_shape([None])
    seed.set_shape([2])
    return _in_memory_epoch(settings, order, positions, seed,
                            steps * global_batch_size, local)

  ds = _chain_epochs(start_step // steps, start_step % steps, make_epoch)
  return ds.map(_in_memory_batch_fn(settings, images, labels,
                                    normalize=False),
                num_parallel_calls=tf.data.AUTOTUNE)


def _check_steps(num_train: int, global_batch_size: int,
                 start_step: int) -> int:
  steps = num_train // global_batch_size
  if steps == 0:
    raise ValueError(f'train.batch_size {global_batch_size} is larger than '
                     f'the {num_train} training images')
  if not 0 <= start_step <= steps:
    raise ValueError(f'start_step must be in [0, {steps}], got {start_step}')
  return steps


def _chain_epochs(first_epoch: int, first_start: int,
                  make_epoch) -> tf.data.Dataset:
  """Epochs first_epoch, first_epoch + 1, ... without end, as one dataset.

  Args:
    first_epoch: the epoch to start in.
    first_start: the step of `first_epoch` to start at; later epochs start
      at 0.
    make_epoch: (epoch, start), int64 scalar tensors -> the dataset of that
      epoch from batch `start` on. Traced once; must not depend on Python
      values of its arguments.

  Returns:
    The epochs' elements one epoch after the other, in order. The next
    epoch's dataset is opened while the current one is read (one epoch
    ahead: for ImageNet that fills its shuffle buffer early, one more
    buffer's worth of memory), so the batches after an epoch boundary are
    ready when the loop gets there.
  """
  epochs = tf.data.Dataset.counter(first_epoch)

  # Plain Python, traced once: autograph would otherwise rewrite tfds's
  # as_dataset and everything it calls.
  @tf.autograph.experimental.do_not_convert
  def one(epoch):
    start = tf.where(tf.equal(epoch, first_epoch),
                     tf.constant(first_start, tf.int64),
                     tf.constant(0, tf.int64))
    return make_epoch(epoch, start)

  parallel_interleave = getattr(tf.data.experimental, 'parallel_interleave',
                                None)
  if parallel_interleave is None:
    # Opens two epochs ahead (TensorFlow's default); same order.
    return epochs.interleave(one, cycle_length=1, block_length=1,
                             num_parallel_calls=1, deterministic=True)
  # The deprecated form is the one that still takes prefetch_input_elements;
  # with cycle_length 1 and sloppy=False its order is flat_map's.
  with _silence_deprecation():
    return epochs.apply(parallel_interleave(
        one, cycle_length=1, block_length=1, sloppy=False,
        buffer_output_elements=2, prefetch_input_elements=1))


# ----------------------------------------------------------------------------
# Streaming (ImageNet).


def _streaming_split(settings: _Settings, process_index: int,
                     process_count: int) -> str:
  """This process's contiguous share of the training records."""
  return tfds.split_for_jax_process(
      f'train[{settings.holdout}:]', process_index=process_index,
      process_count=process_count)


def _streaming_epoch_seeds(seed: int, epoch: int) -> np.ndarray:
  """int64 (3,): the epoch's file shuffle, buffer shuffle and augmentation
  seeds."""
  return np.array([
      splits.seed_words(seed, epoch, splits.FILE_SHUFFLE_TAG, num=1)[0],
      splits.seed_words(seed, epoch, splits.BUFFER_SHUFFLE_TAG, num=1)[0],
      splits.seed_words(seed, epoch, splits.AUGMENT_TAG)[0],
  ], np.int64)


def _streaming_epoch(settings: _Settings, builder: tfds.core.DatasetBuilder,
                     split: str, seeds, start, steps: int,
                     local: int) -> tf.data.Dataset:
  """One epoch of a process's training records, still encoded, in batches.

  Args:
    settings: the dataset settings.
    builder: the prepared tfds builder.
    split: this process's tfds split (`_streaming_split`).
    seeds: (file, buffer, augment) seeds of the epoch
      (`_streaming_epoch_seeds`): Python ints for `train_batches`, int64
      scalar tensors computed in the pipeline for `train_stream` (tfds and
      tf.data take either, with the same result).
    start: the first batch (int or int64 scalar tensor).
    steps: batches in the epoch.
    local: this process's batch size.

  Returns:
    Batches of `local` records {'key': int64, 'position': int64 (the
    record's index in the process's epoch), 'image': string, 'label':
    int64}, from batch `start` on; only full batches.
  """
  file_seed, buffer_seed, augment_key = seeds
  ds = builder.as_dataset(
      split=split, shuffle_files=True,
      read_config=tfds.ReadConfig(shuffle_seed=file_seed,
                                  try_autocache=False),
      decoders={'image': tfds.decode.SkipDecoding()})
  # An explicit op seed makes the buffer's order a function of the input order
  # (as long as nobody sets TF's global seed, which nothing here does).
  ds = ds.shuffle(settings.shuffle_buffer, seed=buffer_seed,
                  reshuffle_each_iteration=False)
  # Every process yields the same number of batches, whatever its share.
  ds = ds.take(steps * local).enumerate()
  ds = ds.skip(start * local)  # still encoded: skipping is cheap
  key = tf.cast(augment_key, tf.int64)
  ds = ds.map(lambda position, example: {
      'key': key, 'position': position, 'image': example['image'],
      'label': example['label']})
  return ds.batch(local, drop_remainder=True)


def _imagenet_image(settings: _Settings, encoded: tf.Tensor,
                    seed: tf.Tensor | None) -> tf.Tensor:
  """Encoded image -> uint8 (size, size, 3): the training transform seeded
  by `seed` (int64 (2,)), or without a seed the evaluation one."""
  size = settings.image_size
  if seed is None or settings.augment == 'none':
    resize = int(round(size * IMAGENET_EVAL_RATIO))
    return augment.imagenet_eval(augment.decode_image(encoded), size, resize)
  return augment.imagenet_train_encoded(encoded, seed, size,
                                        settings.jpeg_decode)


def _streaming_batches(settings: _Settings, records: tf.data.Dataset,
                       stride: int, offset: int,
                       local: int) -> tf.data.Dataset:
  """Training batches from batches of records (`_streaming_epoch`).

  The record batches are split and the images decoded and augmented one by
  one, in parallel, then batched again: every record batch is full, so the
  batches are the same as each epoch's own, while decoding runs on without a
  break at epoch boundaries. The augmentation of the record at `position` is
  seeded by (key, position * stride + offset): process p of P keys its
  records p, p + P, ...
  """

  def preprocess(record):
    seed = tf.stack([record['key'], record['position'] * stride + offset])
    image = tf.ensure_shape(_imagenet_image(settings, record['image'], seed),
                            settings.image_shape)
    return {'image': image, 'label': tf.cast(record['label'], tf.int32)}

  ds = records.unbatch().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(local, drop_remainder=True)


def _streaming_train(settings: _Settings, epoch: int, start_step: int,
                     global_batch_size: int, process_index: int,
                     process_count: int) -> tf.data.Dataset:
  builder = _builder(settings)
  num_train, _, _ = _sizes(settings, builder)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  steps = _check_steps(num_train, global_batch_size, start_step)
  seeds = [int(w) for w in _streaming_epoch_seeds(settings.seed, epoch)]
  records = _streaming_epoch(
      settings, builder, _streaming_split(settings, process_index,
                                          process_count),
      seeds, start_step, steps, local)
  return _streaming_batches(settings, records, process_count, process_index,
                            local)


def _streaming_stream(settings: _Settings, start_step: int,
                      global_batch_size: int, process_index: int,
                      process_count: int) -> tf.data.Dataset:
  """`_streaming_train` of every epoch from `start_step` on, one pipeline:
  the epochs' record streams are chained (`_chain_epochs`) and decoded by
  one parallel map."""
  builder = _builder(settings)
  num_train, _, _ = _sizes(settings, builder)
  local = _local_batch_size(global_batch_size, process_index, process_count)
  steps = _check_steps(num_train, global_batch_size, 0)
  split = _streaming_split(settings, process_index, process_count)

  def make_epoch(epoch, start):
    # numpy's SeedSequence derives the seeds, as for train_batches.
    seeds = tf.numpy_function(
        lambda e: _streaming_epoch_seeds(settings.seed, int(e)), [epoch],
        tf.int64, stateful=False)
    seeds.set_shape([3])
    return _streaming_epoch(settings, builder, split, tf.unstack(seeds),
                            start, steps, local)

  records = _chain_epochs(start_step // steps, start_step % steps,
                          make_epoch)
  return _streaming_batches(settings, records, process_count, process_index,
                            local)


def _streaming_eval(settings: _Settings, split: str, rows: _EvalRows,
                    augment_key: np.ndarray | None,
                    normalize: bool) -> tf.data.Dataset:
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
  key = None if augment_key is None else tf.constant(augment_key[0], tf.int64)

  def preprocess(position, example):
    seed = None if key is None else tf.stack([key, position])
    image = tf.ensure_shape(_imagenet_image(settings, example['image'], seed),
                            settings.image_shape)
    if normalize:
      image = augment.to_float_normalized(image, settings.mean, settings.std)
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  # take: a no-op on real data; bounds mocked splits that ignore slicing.
  # Every process reads the records but decodes only its own rows.
  ds = ds.take(count).enumerate().filter(
      lambda position, _: rows.owns(position))
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return rows.padded(ds.batch(rows.local), count, settings.image_shape,
                     tf.float32 if normalize else tf.uint8)


# ----------------------------------------------------------------------------
# Public entry points.


def train_batches(config, *, epoch: int, start_step: int = 0,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
  """Augmented training batches of epoch `epoch`, from batch `start_step` on.

  Each batch is {'image': uint8 (B, H, W, 3), 'label': int32 (B,)} with
  B = config.train.batch_size // process_count; only full batches. The
  images travel to the devices as bytes: the training step normalises them
  there with `input_spec(config)`'s mean and std, as ToTensor + Normalize
  (`augment.to_float_normalized`) would. The same
  (config, epoch) gives the same batches in any run; process p of P gets its
  own part of every global batch (see the module docstring). A new pipeline
  per call: a training loop reads `train_stream` instead.
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


class _Stream:
  """An endless iterator over a tf.data pipeline that calls numpy.

  Its pipeline runs numpy functions (each epoch's permutation and seeds) on
  tf.data's threads. If the iterator were still alive when the interpreter
  shuts down, a thread inside such a function would wait for the GIL
  forever and the process would hang on exit (it did, about one run in four
  with a live stream); `close()`, called for every open stream at exit,
  stops the pipeline while Python still runs.
  """

  def __init__(self, ds: tf.data.Dataset):
    self._iterator = ds.as_numpy_iterator()
    _OPEN_STREAMS.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._iterator is None:
      raise StopIteration
    return next(self._iterator)

  def close(self) -> None:
    """Stops the pipeline; the stream yields nothing more."""
    self._iterator = None  # the last reference: tf.data stops its threads
    _OPEN_STREAMS.discard(self)


_OPEN_STREAMS = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
  for stream in list(_OPEN_STREAMS):
    stream.close()


def train_stream(config, *, start_step: int = 0, process_index: int = 0,
                 process_count: int = 1) -> _Stream:
  """All training batches from global iteration `start_step` on, without end.

  Batch for batch what `train_batches` gives for epoch e = start_step // S
  from step start_step % S, then for epochs e + 1, e + 2, ... from step 0
  (S = `steps_per_epoch`), so a resume at any iteration continues the same
  sequence. Unlike calls of `train_batches`, one tf.data pipeline serves
  every epoch: nothing is rebuilt at an epoch boundary, and the next epoch
  is opened (for ImageNet, its shuffle buffer filled) and decoded ahead
  while the current one is read.

  Args:
    config: the experiment config (config.dataset, config.seed,
      config.train.batch_size).
    start_step: the global iteration (counted from the start of training)
      of the first batch.
    process_index: this process.
    process_count: processes reading their parts of every global batch.

  Returns:
    An iterator of {'image': uint8 (B, H, W, 3), 'label': int32 (B,)}
    (see `train_batches`), B = config.train.batch_size // process_count;
    `close()` stops it.
  """
  settings = _settings(config)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  global_batch_size = int(config.train.batch_size)
  if settings.kind.streaming:
    make = _streaming_stream
  else:
    _builder(settings)  # DatasetNotFoundError before loading anything
    make = _in_memory_stream
  ds = make(settings, start_step, global_batch_size, process_index,
            process_count)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(settings))
  return _Stream(ds)


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


@dataclasses.dataclass(frozen=True)
class _EvalRows:
  """Which rows of an evaluation split one process serves: the split in
  global batches of `global_batch` examples, process p holding rows
  [p * local, (p + 1) * local) of each (the rows its devices take)."""
  global_batch: int
  process_index: int
  process_count: int

  @property
  def local(self) -> int:
    return self.global_batch // self.process_count

  def owns(self, position):
    """Whether split position(s) `position` (int, numpy or tf) are ours."""
    return (position % self.global_batch) // self.local == self.process_index

  def positions(self, count: int) -> np.ndarray:
    """Our positions among `count` examples, in order."""
    positions = np.arange(count)
    return positions[self.owns(positions)]

  def padded(self, batches: tf.data.Dataset, count: int, image_shape: tuple,
             image_dtype) -> tf.data.Dataset:
    """Our examples of a split of `count`, batched by `local` -> exactly one
    padded local batch per global batch of the split (a process past the
    split's end gets all-padding batches, so every process runs the same
    number of steps)."""
    num_batches = -(-count // self.global_batch)
    empty = tf.data.Dataset.from_tensors({
        'image': tf.zeros((0,) + tuple(image_shape), image_dtype),
        'label': tf.zeros((0,), tf.int32)}).repeat()
    batches = batches.concatenate(empty).take(num_batches)
    return batches.map(lambda b: _pad_batch(b, self.local, image_shape))


def eval_batches(config, split: str, batch_size: int, *,
                 augment: bool = False, process_index: int = 0,
                 process_count: int = 1,
                 as_bytes: bool = False) -> Iterator[dict]:
  """Every example of `split` exactly once, in a fixed order.

  Args:
    config: the experiment config.
    split: 'holdout' (the threshold split), 'test' or 'train' (the training
      images, without the holdout).
    batch_size: examples per (global) batch; the last one is padded.
    augment: the training augmentation with a fixed seed (derived from
      config.seed, the same in every call), for thresholds searched on the
      training set as the original does; otherwise none.
    process_index, process_count: this process's share: rows
      [p * b, (p + 1) * b) of every global batch, b = batch_size /
      process_count (only those are decoded); the P local batches of a step
      together are the global batch of one process.
    as_bytes: uint8 images, for normalising on the devices (as training
      batches); otherwise float32 normalised as ToTensor + Normalize.

  Returns:
    Batches {'image': float32 or uint8 (b, H, W, 3), 'label': int32 (b,),
    'mask': bool (b,)}, False on padding rows; ceil(N / batch_size) of them
    on every process.
  """
  settings = _settings(config)
  if split not in EVAL_SPLITS:
    raise ValueError(f'split must be one of {EVAL_SPLITS}, got {split!r}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ValueError(f'eval.batch_size {batch_size} must be a multiple of the '
                     f'{process_count} processes (process_index '
                     f'{process_index})')
  rows = _EvalRows(batch_size, process_index, process_count)
  builder = _builder(settings)
  if split == 'holdout' and _sizes(settings, builder)[1] == 0:
    raise ValueError(f'{settings.name} has no holdout split '
                     '(config.dataset.holdout is 0)')
  augment_key = (splits.seed_words(settings.seed, splits.EVAL_AUGMENT_TAG)
                 if augment else None)
  if settings.kind.streaming:
    ds = _streaming_eval(settings, split, rows, augment_key,
                         normalize=not as_bytes)
  else:
    images, labels, indices = _in_memory_source(settings, split)
    ours = rows.positions(len(indices))
    params = None
    if augment_key is not None and settings.augment != 'none':
      # Row i of the table belongs to position i of the split.
      params = tf.gather(_crop_params(settings, augment_key, len(indices)),
                         ours)
    ds = _in_memory_batches(settings, images, labels, indices[ours], params,
                            rows.local, drop_remainder=False,
                            normalize=not as_bytes)
    ds = rows.padded(ds, len(indices), settings.image_shape,
                     tf.uint8 if as_bytes else tf.float32)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(settings))
  return ds.as_numpy_iterator()
