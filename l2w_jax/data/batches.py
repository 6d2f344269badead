"""Batch arithmetic both pipelines share: per-process batch sizes, the
steps of an epoch, epochs chained into one pipeline, the rows of the
evaluation batches each process owns, padding."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import tensorflow as tf

from l2w_jax.data import splits


# pylint: disable=g-direct-tensorflow-import,g-import-not-at-top
try:  # Private; it only silences a deprecation warning (`chain_epochs`).
  from tensorflow.python.util import deprecation as _tf_deprecation
  silence_deprecation = _tf_deprecation.silence
except (ImportError, AttributeError):
  silence_deprecation = contextlib.nullcontext
# pylint: enable=g-direct-tensorflow-import,g-import-not-at-top


def local_batch_size(global_batch_size: int, process_index: int,
                      process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got '
                     f'{process_index}')
  if global_batch_size % process_count:
    raise ValueError(f'train.batch_size {global_batch_size} is not divisible '
                     f'by the {process_count} processes')
  return global_batch_size // process_count


def check_steps(num_train: int, global_batch_size: int, start_step: int,
                last_batch: str) -> int:
  steps = splits.epoch_steps(num_train, global_batch_size, last_batch)
  if steps == 0:
    raise ValueError(f'train.batch_size {global_batch_size} is larger than '
                     f'the {num_train} training images')
  if not 0 <= start_step <= steps:
    raise ValueError(f'start_step must be in [0, {steps}], got {start_step}')
  return steps


def chain_epochs(first_epoch: int, first_start: int,
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
  with silence_deprecation():
    return epochs.apply(parallel_interleave(
        one, cycle_length=1, block_length=1, sloppy=False,
        buffer_output_elements=2, prefetch_input_elements=1))


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
class EvalRows:
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
