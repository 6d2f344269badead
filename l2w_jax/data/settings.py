"""`config.dataset` (and `config.seed`) read, resolved against the
catalogue and checked: one line naming the field for a bad value."""

from __future__ import annotations

import dataclasses
import os

from l2w_jax.data import augment
from l2w_jax.data import splits
from l2w_jax.data.catalogue import DatasetKind, DATASETS, KINDS


PROTOCOLS = ('train', 'holdout')


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.dataset (plus seed), resolved and checked."""
  name: str
  kind: DatasetKind
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
  # config.train.last_batch: 'keep' (the originals') or 'drop'.
  last_batch: str = 'keep'
  # config.eval.threshold_images: thresholds on a fixed random subset of
  # that many training images (0: all of them).
  threshold_images: int = 0
  # config.dataset.skip_corrupt: train without the records that cannot be
  # read (`records`) instead of stopping at the first.
  skip_corrupt: bool = False

  @property
  def image_shape(self) -> tuple:
    return (self.image_size, self.image_size, 3)


def settings_from_config(config) -> Settings:
  """Reads and validates config.dataset and config.seed."""
  dataset = config.dataset
  name = dataset.name
  if name not in KINDS:
    raise ValueError(f'dataset.name: unknown dataset {name!r}; available: '
                     f'{DATASETS}')
  kind = KINDS[name]
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
  protocol = protocol_of(config)
  holdout = dataset.get('holdout', None)
  if holdout is None:
    holdout = kind.holdout if protocol == 'holdout' else 0
  holdout = int(holdout)
  if holdout < 0:
    raise ValueError(f'dataset.holdout: must be >= 0, got {holdout}')
  if protocol == 'train' and holdout and not kind.embedded:
    raise ValueError(f'dataset.holdout={holdout} holds images out that '
                     'eval.protocol=train never uses: set '
                     'eval.protocol=holdout (MSDNet\'s protocol) or leave '
                     'dataset.holdout unset')
  if protocol == 'holdout' and holdout == 0 and not kind.embedded:
    raise ValueError('eval.protocol=holdout needs held-out images: set '
                     'dataset.holdout > 0 or leave it unset (the dataset\'s '
                     f'{kind.holdout})')
  threshold_images = int(config.get('eval', {}).get('threshold_images', 0)
                         or 0)
  if threshold_images < 0 or (threshold_images and protocol != 'train'):
    raise ValueError(f'eval.threshold_images: a count >= 0 of training '
                     f'images for eval.protocol=train, got {threshold_images}'
                     f' with eval.protocol={protocol}')
  last_batch = splits.check_last_batch(
      config.get('train', {}).get('last_batch', 'keep'))
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
  return Settings(
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
      jpeg_decode=jpeg_decode,
      last_batch=last_batch,
      threshold_images=threshold_images,
      skip_corrupt=_flag(dataset, 'skip_corrupt'))


def _flag(dataset, field: str) -> bool:
  """A boolean of config.dataset, or ValueError naming it."""
  value = dataset.get(field, False)
  if value in (None, False, 0):
    return False
  if value is True or value == 1:
    return True
  raise ValueError(f'dataset.{field}: must be True or False, got {value!r}')


def protocol_of(config) -> str:
  """config.eval.protocol: 'train' (L2W-DEN: train on every training
  image, thresholds on them augmented) or 'holdout' (MSDNet: thresholds on
  images held out of training)."""
  protocol = config.get('eval', {}).get('protocol', 'train')
  if protocol not in PROTOCOLS:
    raise ValueError(f'eval.protocol: unknown protocol {protocol!r}; use one '
                     f'of {PROTOCOLS}')
  return protocol


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
