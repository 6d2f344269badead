"""The in-memory pipelines (the digits, CIFAR): a split loaded once as
uint8 arrays, epochs as seeded permutations, augmentation by stateless
draws (see `pipeline`)."""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from l2w_jax.data import augment
from l2w_jax.data import records
from l2w_jax.data import splits
from l2w_jax.data.batches import chain_epochs, check_steps, local_batch_size
from l2w_jax.data.catalogue import CROP_PADDING
from l2w_jax.data.records import BadRecord
from l2w_jax.data.settings import Settings


@functools.lru_cache(maxsize=4)
def _load_split(tfds_name: str, data_dir: str | None, split: str,
                skip_corrupt: bool = False
                ) -> tuple[np.ndarray, np.ndarray, tuple[BadRecord, ...]]:
  """A whole tfds split as uint8 (N, H, W, 3) images and int32 (N,) labels,
  and the records left out as unreadable.

  A record that cannot be read stops the load with `CorruptRecordError`
  naming it, or with `skip_corrupt` is left out: its row stays, zero, so
  that every other record keeps its index, and it is returned among the
  skipped (the pipelines leave those rows out).
  """
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  records.remember_files(builder)
  try:
    return (*_read_whole(builder, split), ())
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
    bad = records.scan_split(builder, split)
    if not bad:
      raise
  if not skip_corrupt:
    raise records.CorruptRecordError(
        records.corrupt_message(tfds_name, bad, builder)) from None
  images, labels = _read_whole(builder, split,
                               records.records_around(builder, split, bad))
  kept = np.setdiff1d(np.arange(len(labels) + len(bad)),
                      [record.position for record in bad])
  full_images = np.zeros((len(kept) + len(bad),) + images.shape[1:],
                         images.dtype)
  full_labels = np.zeros((len(kept) + len(bad),), labels.dtype)
  full_images[kept], full_labels[kept] = images, labels
  return full_images, full_labels, tuple(bad)


def _read_whole(builder: tfds.core.DatasetBuilder, split: str,
                ds: tf.data.Dataset | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images and int32 labels of a split's records (by default tfds's,
  unshuffled), read in chunks."""
  if ds is None:
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
  _file_order.cache_clear()
  records.forget_files()


def _tfds_split(settings: Settings, role: str) -> str:
  """The tfds split that holds the examples of `role`."""
  if settings.kind.embedded:
    return {'train': 'train', 'thresholds': 'train', 'holdout': 'validation',
            'test': 'test'}[role]
  return settings.kind.test_split if role == 'test' else 'train'


def _loaded(settings: Settings, split: str):
  """`_load_split` of a tfds split of the settings' dataset."""
  return _load_split(settings.kind.tfds_name, settings.data_dir, split,
                     settings.skip_corrupt)


def skipped_records(settings: Settings) -> tuple[BadRecord, ...]:
  """The records of the dataset's splits left out as unreadable
  (config.dataset.skip_corrupt), every split loaded; () without the
  option (a record that cannot be read then stops the load) and for a
  streaming dataset (its stream finds them as it reads)."""
  if not settings.skip_corrupt or settings.kind.streaming:
    return ()
  names = sorted({_tfds_split(settings, role)
                  for role in ('train', 'holdout', 'test')})
  return tuple(record for name in names
               for record in _loaded(settings, name)[2])


def in_memory_source(settings: Settings, role: str, *,
                     with_skipped: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, indices) of 'train', 'holdout' or 'test'.

  `indices` select, in a fixed order, the examples of the role from the
  loaded tfds split. Records skipped as unreadable (`_load_split`) are left
  out of them, unless `with_skipped`: the training epochs permute every
  index and then leave those out (`skipped_mask`), so that every other
  record keeps its place in the epoch's order.
  """
  images, labels, indices = _source_indices(settings, role)
  if not with_skipped:
    indices = indices[~skipped_mask(settings, role, indices)]
  return images, labels, indices


def skipped_mask(settings: Settings, role: str,
                 indices: np.ndarray) -> np.ndarray:
  """bool (len(indices),): which of the role's indices are skipped
  records."""
  skipped = [record.position
             for record in _loaded(settings, _tfds_split(settings, role))[2]]
  return np.isin(indices, np.asarray(skipped, np.int64))


def _source_indices(settings: Settings,
                    role: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  images, labels, _ = _loaded(settings, _tfds_split(settings, role))
  indices = np.arange(len(labels))
  if settings.kind.embedded and role == 'thresholds':
    return images, labels, splits.threshold_subset(indices,
                                                   settings.threshold_images)
  if settings.kind.embedded or role == 'test':
    return images, labels, indices
  if settings.kind.long_tailed:
    # The long-tailed subset first; the holdout (if any) is a fixed random
    # subset of it, by the same rule as for the balanced sets.
    indices = long_tail_pool(settings)
  train, holdout = splits.holdout_split(indices, settings.holdout)
  if role == 'thresholds':
    return images, labels, splits.threshold_subset(train,
                                                   settings.threshold_images)
  return images, labels, (train if role == 'train' else holdout)


def long_tail_pool(settings: Settings) -> np.ndarray:
  """Indices into tfds cifar100 'train' of the long-tailed subset.

  LDAM-DRW's subset (`splits.long_tail_indices`) is defined on the order of
  the CIFAR-100 files; tfds stores the records shuffled but names each by
  its position in the file ('id': 'train_00042'), so the labels are put in
  file order first. Records without such ids (mocked data) keep tfds order.
  """
  _, labels, skipped = _loaded(settings, 'train')
  order = _file_order(settings.kind.tfds_name, settings.data_dir, len(labels))
  if skipped:
    # Unread labels: the subset is drawn from the records that were read.
    order = order[~np.isin(order, [record.position for record in skipped])]
  kept = splits.long_tail_indices(labels[order], settings.kind.num_classes,
                                  settings.imbalance_factor)
  return np.sort(order[kept])


@functools.lru_cache(maxsize=2)
def _file_order(tfds_name: str, data_dir: str | None, num: int) -> np.ndarray:
  """int64 (num,): the tfds 'train' positions of the file's records 0, 1,
  ...; the identity when the ids are not 'train_<position>'."""
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  ds = builder.as_dataset(
      split='train', shuffle_files=False,
      read_config=tfds.ReadConfig(try_autocache=False),
      decoders=tfds.decode.PartialDecoding({'id': True}))
  try:
    ids = [record['id'] for record in tfds.as_numpy(ds)]
    positions = np.array([int(bytes(i).decode().rsplit('_', 1)[1])
                          for i in ids], np.int64)
  except (KeyError, ValueError, IndexError, TypeError):
    return np.arange(num, dtype=np.int64)
  if len(positions) != num or not np.array_equal(np.sort(positions),
                                                 np.arange(num)):
    return np.arange(num, dtype=np.int64)
  return np.argsort(positions).astype(np.int64)


def crop_params(settings: Settings, seed, num: int) -> tf.Tensor:
  """int32 (num, 3) crop/flip parameters; row i belongs to position i.

  `seed`: int64 (2,), numpy or a tensor computed in the pipeline.
  """
  return augment.crop_flip_params(
      tf.convert_to_tensor(seed, tf.int64), num, CROP_PADDING,
      flip=settings.augment == 'crop_flip')


def _in_memory_batch_fn(settings: Settings, images: np.ndarray,
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


def in_memory_batches(settings: Settings, images: np.ndarray,
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


def _in_memory_epoch(settings: Settings, order, positions, augment_seed,
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
    local: this process's batch size (of the full batches; the epoch's last
      batch holds what is left of `order`).

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
    table = crop_params(settings, augment_seed, table_size)
    ds = tf.data.Dataset.from_tensor_slices(
        (order, tf.gather(table, positions)))
  return ds.batch(local)


def in_memory_train(settings: Settings, epoch: int, start_step: int,
                     global_batch_size: int, process_index: int,
                     process_count: int, num_devices: int) -> tf.data.Dataset:
  images, labels, train = in_memory_source(settings, 'train',
                                           with_skipped=True)
  dropped = skipped_mask(settings, 'train', train)
  local = local_batch_size(global_batch_size, process_index, process_count)
  steps = check_steps(len(train) - int(dropped.sum()), global_batch_size,
                      start_step, settings.last_batch)
  order, positions = splits.epoch_batches(
      len(train), global_batch_size, settings.seed, epoch, start_step,
      process_index, process_count, settings.last_batch, num_devices,
      dropped=dropped)
  ds = _in_memory_epoch(
      settings, train[order].astype(np.int64), positions,
      splits.seed_words(settings.seed, epoch, splits.AUGMENT_TAG),
      steps * global_batch_size, local)
  return ds.map(_in_memory_batch_fn(settings, images, labels,
                                    normalize=False),
                num_parallel_calls=tf.data.AUTOTUNE)


def in_memory_stream(settings: Settings, start_step: int,
                      global_batch_size: int, process_index: int,
                      process_count: int, num_devices: int) -> tf.data.Dataset:
  """`in_memory_train` of every epoch from `start_step` on, one pipeline.

  Each epoch's permutation is numpy's (`splits.epoch_batches`), so it is
  computed by a numpy_function when the pipeline reaches the epoch (a
  permutation of at most 50,000 indices: well under a millisecond).
  """
  images, labels, train = in_memory_source(settings, 'train',
                                           with_skipped=True)
  dropped = skipped_mask(settings, 'train', train)
  local = local_batch_size(global_batch_size, process_index, process_count)
  steps = check_steps(len(train) - int(dropped.sum()), global_batch_size, 0,
                      settings.last_batch)

  def epoch_arrays(epoch, start):
    epoch, start = int(epoch), int(start)
    order, positions = splits.epoch_batches(
        len(train), global_batch_size, settings.seed, epoch, start,
        process_index, process_count, settings.last_batch, num_devices,
        dropped=dropped)
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

  ds = chain_epochs(start_step // steps, start_step % steps, make_epoch)
  return ds.map(_in_memory_batch_fn(settings, images, labels,
                                    normalize=False),
                num_parallel_calls=tf.data.AUTOTUNE)
