"""tensorflow-datasets plumbing: TensorFlow kept off the accelerators,
tf.data options, the dataset builder, and the message that says how to
prepare a dataset that is not there."""

from __future__ import annotations

import functools
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from l2w_jax.data import records
from l2w_jax.data.catalogue import DatasetNotFoundError
from l2w_jax.data.settings import Settings


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


_configure_tensorflow()


def tf_data_options(settings: Settings) -> tf.data.Options:
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


def _prepare_command(settings: Settings, data_dir: str,
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


def _not_found_message(settings: Settings, builder) -> str:
  data_dir = os.fspath(builder.data_dir_root)
  tfds_name = settings.kind.tfds_name
  head = (f'dataset {settings.name!r}: the tfds dataset {tfds_name!r} is not '
          f'prepared in data_dir {data_dir} (no {builder.data_path}).')
  if settings.kind.manual_files:
    manual_dir = settings.manual_dir or os.path.join(data_dir, 'downloads',
                                                     'manual')
    return (f'{head} tfds needs the manual download: place '
            f'{" and ".join(settings.kind.manual_files)} (from '
            f'https://image-net.org) in the manual_dir {manual_dir} '
            '(config.dataset.manual_dir) and run\n  '
            f'{_prepare_command(settings, data_dir, manual_dir)}\n'
            'or set --config.dataset.data_dir to where it is prepared.')
  return (f'{head} It cannot be downloaded here: prepare on a machine with '
          f'network:\n  {_prepare_command(settings, data_dir)}\n'
          f'and copy the directory {os.path.join(data_dir, tfds_name)} here, '
          'or set --config.dataset.data_dir to where it is.')


def dataset_builder(settings: Settings) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder, or DatasetNotFoundError (nothing downloaded).

  The embedded datasets are prepared on first use (from scikit-learn's
  digits).
  """
  _configure_tensorflow()
  builder = tfds.builder(settings.kind.tfds_name, data_dir=settings.data_dir)
  if _is_mocked():
    return builder
  if builder.is_prepared():
    records.remember_files(builder)  # to name files that change later
    return builder
  if settings.kind.embedded:
    print(f'preparing {settings.kind.tfds_name} in {builder.data_dir} (first '
          'use only; nothing is downloaded)', flush=True)
    tfds.disable_progress_bar()  # tfds' per-split bars would fill the screen
    builder.download_and_prepare()
    records.remember_files(builder)
    return builder
  raise DatasetNotFoundError(_not_found_message(settings, builder))


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Examples in a whole tfds split, from the metadata."""
  if split in builder.info.splits:
    return builder.info.splits[split].num_examples
  # Only under tfds.testing.mock_data without metadata files, where split
  # sizes are unknown: the mock's cardinality (its num_examples).
  return int(builder.as_dataset(split=split).cardinality())
