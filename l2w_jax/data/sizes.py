"""How many images each split serves, the input spec the devices
normalise with, and iterations per epoch."""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from l2w_jax.data import splits
from l2w_jax.data.catalogue import DataInfo, IMAGENET_EVAL_RATIO
from l2w_jax.data.in_memory import (in_memory_source, long_tail_pool,
                                    skipped_records)
from l2w_jax.data.settings import Settings, settings_from_config
from l2w_jax.data.tfds_source import dataset_builder, split_size


def split_sizes(settings: Settings,
           builder: tfds.core.DatasetBuilder) -> tuple[int, int, int]:
  """(num_train, num_holdout, num_test) from metadata and the split rules;
  with config.dataset.skip_corrupt (in memory), counted on the splits as
  loaded, without the records left out."""
  name = settings.name
  if settings.kind.embedded:
    sizes = (split_size(builder, 'train'), split_size(builder, 'validation'),
             split_size(builder, 'test'))
    return _without_skipped(settings, sizes)
  if settings.kind.long_tailed:
    # Needs the labels: the split is loaded (and cached for the pipelines).
    pool = len(long_tail_pool(settings))
  else:
    pool = split_size(builder, 'train')
  test = split_size(builder, settings.kind.test_split)
  if not 0 <= settings.holdout < pool:
    raise ValueError(f'dataset.holdout: must be in [0, {pool}) for {name}, '
                     f'got {settings.holdout}')
  return _without_skipped(settings,
                          (pool - settings.holdout, settings.holdout, test))


def _without_skipped(settings: Settings,
                     sizes: tuple[int, int, int]) -> tuple[int, int, int]:
  """`sizes`, or with config.dataset.skip_corrupt (in memory) those of the
  splits as loaded, without the records left out."""
  if not settings.skip_corrupt or settings.kind.streaming:
    return sizes
  return tuple(len(in_memory_source(settings, role)[2])
               for role in ('train', 'holdout', 'test'))


def data_info(config) -> DataInfo:
  """Sizes and shapes of config.dataset, from the tfds metadata.

  Args:
    config: the experiment config (config.dataset).

  Returns:
    `DataInfo`: name, num_classes, image_shape (H, W, 3), and the examples
    in the training set (without the holdout), the holdout, the test set and
    the training images thresholds are searched on.

  Raises:
    DatasetNotFoundError: the dataset is not prepared (the message says how
      to prepare it), before anything is read.
  """
  settings = settings_from_config(config)
  builder = dataset_builder(settings)
  num_train, num_holdout, num_test = split_sizes(settings, builder)
  thresholds = settings.threshold_images
  return DataInfo(
      name=settings.name,
      num_classes=settings.kind.num_classes,
      image_shape=settings.image_shape,
      num_train=num_train,
      num_holdout=num_holdout,
      num_test=num_test,
      num_thresholds=(min(thresholds, num_train) if thresholds else
                      num_train),
      skipped=tuple(record.describe()
                    for record in skipped_records(settings)))


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
  """What a model of config.dataset takes, from the config alone (the
  dataset need not be prepared).

  Args:
    config: the experiment config (config.dataset).

  Returns:
    `InputSpec`: name, image_shape (H, W, 3), per-channel mean (3,) and std
    (3,) in ToTensor units, and the evaluation transform in words.
  """
  settings = settings_from_config(config)
  transform = (f'resize the shorter side to '
               f'{int(round(settings.image_size * IMAGENET_EVAL_RATIO))}, '
               f'center crop {settings.image_size}'
               if settings.kind.streaming else 'none')
  return InputSpec(name=settings.name, image_shape=settings.image_shape,
                   mean=settings.mean, std=settings.std,
                   eval_transform=transform)


def steps_per_epoch(info: DataInfo, global_batch_size: int,
                    last_batch: str) -> int:
  """Training iterations in an epoch.

  Args:
    info: the dataset's `DataInfo` (`data_info`).
    global_batch_size: examples per iteration over all processes.
    last_batch: config.train.last_batch, 'keep' or 'drop'.

  Returns:
    ceil(num_train / global_batch_size) with the last partial batch kept (as
    the originals' DataLoaders), num_train // global_batch_size without.
  """
  return splits.epoch_steps(info.num_train, global_batch_size, last_batch)
