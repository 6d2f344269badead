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
import os
from typing import Iterator
import weakref

import tensorflow as tf

from l2w_jax.data import splits
from l2w_jax.data.batches import EvalRows
from l2w_jax.data.catalogue import EVAL_SPLITS
from l2w_jax.data.in_memory import (crop_params, in_memory_batches,
                                    in_memory_source, in_memory_stream,
                                    in_memory_train)
from l2w_jax.data.settings import settings_from_config
from l2w_jax.data.sizes import split_sizes
from l2w_jax.data import records
from l2w_jax.data.streaming import (bad_records_of_batch, streaming_eval,
                                    streaming_stream, streaming_train)
from l2w_jax.data.tfds_source import dataset_builder, tf_data_options


def train_batches(config, *, epoch: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  num_devices: int = 1) -> Iterator[dict]:
  """Augmented training batches of epoch `epoch`, from batch `start_step` on.

  The images travel to the devices as bytes: the training step normalises
  them there with `input_spec(config)`'s mean and std, as ToTensor +
  Normalize (`augment.to_float_normalized`) would. The same (config, epoch)
  gives the same batches in any run. A new pipeline per call: a training
  loop reads `train_stream` instead.

  Args:
    config: the experiment config (config.dataset, config.seed,
      config.train.batch_size).
    epoch: the epoch (>= 0); it seeds the order and the augmentation.
    start_step: the first batch of the epoch to give.
    process_index: this process.
    process_count: processes reading their parts of every global batch
      (process p of P gets its own rows of each, see the module docstring).
    num_devices: the devices of all processes that split every batch: with
      config.train.last_batch='keep' the epoch's last batch is padded to a
      multiple of them (`splits.last_batch_size`).

  Returns:
    An iterator of {'image': uint8 (B, H, W, 3), 'label': int32 (B,)},
    B = config.train.batch_size // process_count; the epoch's last batch
    is smaller with train.last_batch='keep' when the batches do not divide
    the training set.
  """
  settings = settings_from_config(config)
  if epoch < 0:
    raise ValueError(f'epoch must be >= 0, got {epoch}')
  global_batch_size = int(config.train.batch_size)
  make = streaming_train if settings.kind.streaming else in_memory_train
  if not settings.kind.streaming:
    dataset_builder(settings)  # DatasetNotFoundError before loading anything
  ds = make(settings, epoch, start_step, global_batch_size, process_index,
            process_count, num_devices)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(tf_data_options(settings))
  return ds.as_numpy_iterator()


class _Stream:
  """An endless iterator over a tf.data pipeline that calls numpy.

  Its pipeline runs numpy functions (each epoch's permutation and seeds) on
  tf.data's threads. If the iterator were still alive when the interpreter
  shuts down, a thread inside such a function would wait for the GIL
  forever and the process would hang on exit (it did, about one run in four
  with a live stream); `close()`, called for every open stream at exit,
  stops the pipeline while Python still runs.

  A record that fails to read in a streaming pipeline (the in-memory ones
  read everything first) goes to `recover(step, error)`, with `step` the
  global iteration of the batch that failed (tf.data reports errors in
  order): it raises, or returns the pipeline again from that batch, without
  the records it found.
  """

  def __init__(self, ds: tf.data.Dataset, start_step: int = 0,
               recover=None):
    self._iterator = ds.as_numpy_iterator()
    self._step = start_step
    self._recover = recover
    _OPEN_STREAMS.add(self)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while True:
      if self._iterator is None:
        raise StopIteration
      try:
        batch = next(self._iterator)
      except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        if self._recover is None:
          raise
        self._iterator = None
        self._iterator = self._recover(self._step, e).as_numpy_iterator()
        continue
      self._step += 1
      return batch

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
                 process_count: int = 1, num_devices: int = 1,
                 skip_ids: tuple[str, ...] = (), on_skip=None) -> _Stream:
  """All training batches from global iteration `start_step` on, without end.

  Batch for batch what `train_batches` gives for epoch e = start_step // S
  from step start_step % S, then for epochs e + 1, e + 2, ... from step 0
  (S = `steps_per_epoch`), so a resume at any iteration continues the same
  sequence. Unlike calls of `train_batches`, one tf.data pipeline serves
  every epoch: nothing is rebuilt at an epoch boundary, and the next epoch
  is opened (for ImageNet, its shuffle buffer filled) and decoded ahead
  while the current one is read.

  A streaming dataset (ImageNet) finds an unreadable record when it reaches
  it: the stream raises `CorruptRecordError` naming it, or with
  config.dataset.skip_corrupt continues without it (its other records in
  the same order) and reports it to `on_skip`. A resumed run passes what
  was reported as `skip_ids`, which makes its batches those of the run
  that found them.

  Args:
    config: the experiment config (config.dataset, config.seed,
      config.train.batch_size).
    start_step: the global iteration (counted from the start of training)
      of the first batch.
    process_index: this process.
    process_count: processes reading their parts of every global batch.
    num_devices: the devices that split every batch (see `train_batches`).
    skip_ids: tfds ids of records to leave out (streaming only), from
      `on_skip` of an earlier run.
    on_skip: called with each list of `records.BadRecord` left out, and
      their tfds ids, as (records, ids).

  Returns:
    An iterator of {'image': uint8 (B, H, W, 3), 'label': int32 (B,)}
    (see `train_batches`, also for the last batch of an epoch), B =
    config.train.batch_size // process_count; `close()` stops it.
  """
  settings = settings_from_config(config)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  global_batch_size = int(config.train.batch_size)
  layout = (global_batch_size, process_index, process_count, num_devices)
  if not settings.kind.streaming:
    dataset_builder(settings)  # DatasetNotFoundError before loading anything
    ds = in_memory_stream(settings, start_step, *layout)
    return _Stream(_finished(settings, ds), start_step)
  known = tuple(sorted(set(skip_ids)))

  def recover(step: int, error: Exception) -> tf.data.Dataset:
    nonlocal known
    bad = bad_records_of_batch(settings, step, *layout, known)
    if not bad:
      raise error
    builder = dataset_builder(settings)
    truncated = any(record.reason == records.TRUNCATED for record in bad)
    if not settings.skip_corrupt or truncated:
      raise records.CorruptRecordError(records.corrupt_message(
          settings.kind.tfds_name, bad, builder,
          can_skip=not truncated)) from None
    ids = [f'{os.path.basename(record.file)}__{record.record}'
           for record in bad]
    if set(ids) <= set(known):
      raise error  # left out already, yet the batch fails: not these records
    known = tuple(sorted(set(known) | set(ids)))
    if on_skip is not None:
      on_skip(bad, ids)
    return _finished(settings, streaming_stream(settings, step, *layout,
                                                known))

  ds = streaming_stream(settings, start_step, *layout, known)
  return _Stream(_finished(settings, ds), start_step, recover)


def _finished(settings, ds: tf.data.Dataset) -> tf.data.Dataset:
  """A training pipeline prefetched, with the project's tf.data options."""
  return ds.prefetch(tf.data.AUTOTUNE).with_options(tf_data_options(settings))


def eval_batches(config, split: str, batch_size: int, *,
                 augment: bool = False, process_index: int = 0,
                 process_count: int = 1,
                 as_bytes: bool = False) -> Iterator[dict]:
  """Every example of `split` exactly once, in a fixed order.

  Args:
    config: the experiment config.
    split: 'holdout' (held out of training), 'test', 'train' (the training
      images, without the holdout) or 'thresholds' (the training images
      thresholds are searched on under eval.protocol=train: all of them, or
      a fixed random eval.threshold_images of them).
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
  settings = settings_from_config(config)
  if split not in EVAL_SPLITS:
    raise ValueError(f'split must be one of {EVAL_SPLITS}, got {split!r}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if batch_size % process_count or not 0 <= process_index < process_count:
    raise ValueError(f'eval.batch_size {batch_size} must be a multiple of the '
                     f'{process_count} processes (process_index '
                     f'{process_index})')
  rows = EvalRows(batch_size, process_index, process_count)
  builder = dataset_builder(settings)
  if split == 'holdout' and split_sizes(settings, builder)[1] == 0:
    raise ValueError(f'{settings.name} has no holdout split '
                     '(config.dataset.holdout is 0)')
  augment_key = (splits.seed_words(settings.seed, splits.EVAL_AUGMENT_TAG)
                 if augment else None)
  if settings.kind.streaming:
    ds = streaming_eval(settings, split, rows, augment_key,
                         normalize=not as_bytes)
  else:
    images, labels, indices = in_memory_source(settings, split)
    ours = rows.positions(len(indices))
    params = None
    if augment_key is not None and settings.augment != 'none':
      # Row i of the table belongs to position i of the split.
      params = tf.gather(crop_params(settings, augment_key, len(indices)),
                         ours)
    ds = in_memory_batches(settings, images, labels, indices[ours], params,
                            rows.local, drop_remainder=False,
                            normalize=not as_bytes)
    ds = rows.padded(ds, len(indices), settings.image_shape,
                     tf.uint8 if as_bytes else tf.float32)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(tf_data_options(settings))
  return ds.as_numpy_iterator()
