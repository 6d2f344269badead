"""The streaming pipeline (ImageNet): records read in a seeded order,
decoded and augmented with stateless per-position seeds (see
`pipeline`)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from l2w_jax.data import augment
from l2w_jax.data import records
from l2w_jax.data import splits
from l2w_jax.data.batches import (chain_epochs, check_steps, EvalRows,
                                  local_batch_size)
from l2w_jax.data.catalogue import IMAGENET_EVAL_RATIO
from l2w_jax.data.records import BadRecord
from l2w_jax.data.settings import Settings
from l2w_jax.data.sizes import split_sizes
from l2w_jax.data.tfds_source import dataset_builder


def _streaming_split(settings: Settings, process_index: int,
                     process_count: int) -> str:
  """This process's contiguous share of the training records.

  The holdout is the first `settings.holdout` records: tfds orders them by
  a salted hash of their keys (ImageNet's file names), so a fixed
  pseudo-random subset (docs/faithfulness.md, "Data protocol").
  """
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


def _streaming_epoch(settings: Settings, builder: tfds.core.DatasetBuilder,
                     split: str, seeds, start, count: int, local: int,
                     skip_ids: tuple[str, ...] = ()) -> tf.data.Dataset:
  """One epoch of a process's training records, still encoded.

  Args:
    settings: the dataset settings.
    builder: the prepared tfds builder.
    split: this process's tfds split (`_streaming_split`).
    seeds: (file, buffer, augment) seeds of the epoch
      (`_streaming_epoch_seeds`): Python ints for `train_batches`, int64
      scalar tensors computed in the pipeline for `train_stream` (tfds and
      tf.data take either, with the same result).
    start: the first batch (int or int64 scalar tensor).
    count: records of this process in the epoch ((steps - 1) full local
      batches and its share of the last batch). A share with fewer records
      is padded by reading it again (the padding `splits.last_batch_size`
      describes).
    local: this process's batch size.
    skip_ids: tfds ids ('<file name>__<record>') of records to leave out
      (unreadable ones, config.dataset.skip_corrupt). They are taken out
      after the shuffle, so every other record keeps its place in the order
      (those after one move up by one).

  Returns:
    Records {'key': int64, 'position': int64 (the record's index in the
    process's epoch), 'image': string, 'label': int64, 'tfds_id': string},
    from batch `start` on.
  """
  file_seed, buffer_seed, augment_key = seeds
  ds = builder.as_dataset(
      split=split, shuffle_files=True,
      # The same file order on a second pass: the last batch's padding
      # (`repeat` below) reads the epoch's first records again.
      read_config=tfds.ReadConfig(shuffle_seed=file_seed,
                                  shuffle_reshuffle_each_iteration=False,
                                  try_autocache=False, add_tfds_id=True),
      decoders={'image': tfds.decode.SkipDecoding()})
  # An explicit op seed makes the buffer's order a function of the input order
  # (as long as nobody sets TF's global seed, which nothing here does).
  ds = ds.shuffle(settings.shuffle_buffer, seed=buffer_seed,
                  reshuffle_each_iteration=False)
  if skip_ids:
    left_out = tf.constant(sorted(skip_ids))
    ds = ds.filter(lambda example: tf.logical_not(tf.reduce_any(
        tf.equal(example['tfds_id'], left_out))))
  # Every process yields the same number of batches, whatever its share.
  ds = ds.repeat().take(count).enumerate()
  ds = ds.skip(start * local)  # still encoded: skipping is cheap
  key = tf.cast(augment_key, tf.int64)
  return ds.map(lambda position, example: {
      'key': key, 'position': position, 'image': example['image'],
      'label': example['label'],
      # (tfds.testing.mock_data gives no ids.)
      'tfds_id': example.get('tfds_id', tf.constant(''))})


def _epoch_records(settings: Settings, num_train: int, global_batch_size: int,
                   process_count: int, num_devices: int) -> tuple[int, int]:
  """(steps, records per process) of a training epoch."""
  steps = splits.epoch_steps(num_train, global_batch_size,
                             settings.last_batch)
  last = splits.last_batch_size(num_train, global_batch_size,
                                settings.last_batch, num_devices)
  local = global_batch_size // process_count
  return steps, (steps - 1) * local + last // process_count


def _imagenet_image(settings: Settings, encoded: tf.Tensor,
                    seed: tf.Tensor | None) -> tf.Tensor:
  """Encoded image -> uint8 (size, size, 3): the training transform seeded
  by `seed` (int64 (2,)), or without a seed the evaluation one."""
  size = settings.image_size
  if seed is None or settings.augment == 'none':
    resize = int(round(size * IMAGENET_EVAL_RATIO))
    return augment.imagenet_eval(augment.decode_image(encoded), size, resize)
  return augment.imagenet_train_encoded(encoded, seed, size,
                                        settings.jpeg_decode)


def _streaming_batches(settings: Settings, records: tf.data.Dataset,
                       stride: int, offset: int,
                       local: int) -> tf.data.Dataset:
  """Training batches of one epoch's records (`_streaming_epoch`).

  The images are decoded and augmented one by one, in parallel, and batched
  by `local` (the epoch's last batch holds what is left). The augmentation
  of the record at `position` is seeded by (key, position * stride +
  offset): process p of P keys its records p, p + P, ...
  """

  def preprocess(record):
    seed = tf.stack([record['key'], record['position'] * stride + offset])
    image = tf.ensure_shape(_imagenet_image(settings, record['image'], seed),
                            settings.image_shape)
    return {'image': image, 'label': tf.cast(record['label'], tf.int32)}

  ds = records.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(local)


def streaming_train(settings: Settings, epoch: int, start_step: int,
                     global_batch_size: int, process_index: int,
                     process_count: int, num_devices: int) -> tf.data.Dataset:
  builder = dataset_builder(settings)
  num_train, _, _ = split_sizes(settings, builder)
  local = local_batch_size(global_batch_size, process_index, process_count)
  check_steps(num_train, global_batch_size, start_step, settings.last_batch)
  _, count = _epoch_records(settings, num_train, global_batch_size,
                            process_count, num_devices)
  seeds = [int(w) for w in _streaming_epoch_seeds(settings.seed, epoch)]
  records = _streaming_epoch(
      settings, builder, _streaming_split(settings, process_index,
                                          process_count),
      seeds, start_step, count, local)
  return _streaming_batches(settings, records, process_count, process_index,
                            local)


def streaming_stream(settings: Settings, start_step: int,
                      global_batch_size: int, process_index: int,
                      process_count: int, num_devices: int,
                      skip_ids: tuple[str, ...] = ()) -> tf.data.Dataset:
  """`streaming_train` of every epoch from `start_step` on, one pipeline:
  each epoch's records decoded and batched on their own (an epoch's last
  batch may be short), the epochs chained (`chain_epochs`, which opens and
  decodes the next epoch ahead); without the records `skip_ids` names (see
  `_streaming_epoch`)."""
  builder = dataset_builder(settings)
  num_train, _, _ = split_sizes(settings, builder)
  local = local_batch_size(global_batch_size, process_index, process_count)
  check_steps(num_train, global_batch_size, 0, settings.last_batch)
  steps, count = _epoch_records(settings, num_train, global_batch_size,
                                process_count, num_devices)
  split = _streaming_split(settings, process_index, process_count)

  def make_epoch(epoch, start):
    # numpy's SeedSequence derives the seeds, as for train_batches.
    seeds = tf.numpy_function(
        lambda e: _streaming_epoch_seeds(settings.seed, int(e)), [epoch],
        tf.int64, stateful=False)
    seeds.set_shape([3])
    records = _streaming_epoch(settings, builder, split, tf.unstack(seeds),
                               start, count, local, skip_ids)
    return _streaming_batches(settings, records, process_count,
                              process_index, local)

  return chain_epochs(start_step // steps, start_step % steps, make_epoch)


def bad_records_of_batch(settings: Settings, step: int,
                         global_batch_size: int, process_index: int,
                         process_count: int, num_devices: int,
                         skip_ids: tuple[str, ...] = ()) -> list[BadRecord]:
  """The records of this process's training batch `step` (a global
  iteration) that cannot be read: each decoded on its own as the pipeline
  decodes it. A file that ends inside a record stops the read; then this
  process's files are read to the end to find which (the failure path
  only).

  Returns:
    The unreadable records (`BadRecord.position` is -1: a streaming split is
    never loaded whole); [] when every record reads.
  """
  builder = dataset_builder(settings)
  num_train, _, _ = split_sizes(settings, builder)
  local = local_batch_size(global_batch_size, process_index, process_count)
  steps, count = _epoch_records(settings, num_train, global_batch_size,
                                process_count, num_devices)
  epoch, start = divmod(step, steps)
  seeds = [int(w) for w in _streaming_epoch_seeds(settings.seed, epoch)]
  split = _streaming_split(settings, process_index, process_count)
  batch = _streaming_epoch(settings, builder, split, seeds, start, count,
                           local, skip_ids).take(local)
  bad = []
  try:
    for record in batch.as_numpy_iterator():
      name, index = record['tfds_id'].decode().rsplit('__', 1)
      seed = np.array([record['key'], record['position'] * process_count +
                       process_index], np.int64)
      try:
        _imagenet_image(settings, tf.constant(record['image']),
                        tf.constant(seed))
      except (tf.errors.InvalidArgumentError, ValueError) as e:
        bad.append(BadRecord(os.path.join(os.fspath(builder.data_dir), name),
                             int(index), -1, records.decoder_complaint(e)))
  except tf.errors.DataLossError:
    bad += records.truncated_records(builder, split)
  return bad


def streaming_eval(settings: Settings, split: str, rows: EvalRows,
                    augment_key: np.ndarray | None,
                    normalize: bool) -> tf.data.Dataset:
  builder = dataset_builder(settings)
  num_train, num_holdout, num_test = split_sizes(settings, builder)
  tfds_split, count = {
      'train': (f'train[{settings.holdout}:]', num_train),
      'thresholds': (f'train[{settings.holdout}:]', num_train),
      'holdout': (f'train[:{settings.holdout}]', num_holdout),
      'test': (settings.kind.test_split, num_test),
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
  ds = ds.take(count)
  if split == 'thresholds' and settings.threshold_images:
    # A fixed random subset of the training records, in record order.
    chosen = np.zeros((count,), bool)
    chosen[splits.threshold_subset(np.arange(count),
                                   settings.threshold_images)] = True
    count = int(chosen.sum())
    chosen = tf.constant(chosen)
    ds = ds.enumerate().filter(lambda i, _: chosen[i]).map(lambda _, ex: ex)
  # Every process reads the records but decodes only its own rows.
  ds = ds.enumerate().filter(lambda position, _: rows.owns(position))
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return rows.padded(ds.batch(rows.local), count, settings.image_shape,
                     tf.float32 if normalize else tf.uint8)
