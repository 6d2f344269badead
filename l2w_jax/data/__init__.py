"""Input pipelines on tensorflow-datasets, and the embedded digits datasets.

Importing this package registers the tfds datasets `sklearn_digits`
(scikit-learn's handwritten digits) and `graded_digits` (those digits
rendered with graded corruptions), both prepared locally on first use.

The modules: `catalogue` (the datasets), `settings` (config.dataset
checked), `tfds_source` (tfds plumbing), `sizes`, `batches` (batch
arithmetic both pipelines share), `in_memory` and `streaming` (the two
kinds of pipeline), `pipeline` (the entry points below), `augment`,
`splits`, `records` (unreadable records found and named).
"""

from l2w_jax.data import digits  # registers sklearn_digits with tfds
from l2w_jax.data import graded_digits  # registers graded_digits
from l2w_jax.data.catalogue import DataInfo
from l2w_jax.data.catalogue import DATASETS
from l2w_jax.data.catalogue import DatasetNotFoundError
from l2w_jax.data.pipeline import eval_batches
from l2w_jax.data.records import CorruptRecordError
from l2w_jax.data.pipeline import train_batches
from l2w_jax.data.pipeline import train_stream
from l2w_jax.data.settings import host_cpus
from l2w_jax.data.sizes import data_info
from l2w_jax.data.sizes import input_spec
from l2w_jax.data.sizes import InputSpec
from l2w_jax.data.sizes import steps_per_epoch
from l2w_jax.data.splits import last_batch_size

__all__ = [
    'CorruptRecordError', 'DATASETS', 'DataInfo', 'DatasetNotFoundError',
    'InputSpec', 'data_info',
    'eval_batches', 'host_cpus', 'input_spec', 'last_batch_size',
    'steps_per_epoch',
    'train_batches', 'train_stream',
]
