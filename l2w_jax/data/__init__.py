"""Input pipelines on tensorflow-datasets, and the embedded digits datasets.

Importing this package registers the tfds datasets `sklearn_digits`
(scikit-learn's handwritten digits) and `graded_digits` (those digits
rendered with graded corruptions), both prepared locally on first use.
"""

from l2w_jax.data import digits  # registers sklearn_digits with tfds
from l2w_jax.data import graded_digits  # registers graded_digits
from l2w_jax.data.pipeline import DataInfo
from l2w_jax.data.pipeline import DATASETS
from l2w_jax.data.pipeline import DatasetNotFoundError
from l2w_jax.data.pipeline import data_info
from l2w_jax.data.pipeline import eval_batches
from l2w_jax.data.pipeline import host_cpus
from l2w_jax.data.pipeline import input_spec
from l2w_jax.data.pipeline import InputSpec
from l2w_jax.data.pipeline import steps_per_epoch
from l2w_jax.data.pipeline import train_batches
from l2w_jax.data.pipeline import train_stream

__all__ = [
    'DATASETS', 'DataInfo', 'DatasetNotFoundError', 'InputSpec', 'data_info',
    'eval_batches', 'host_cpus', 'input_spec', 'steps_per_epoch',
    'train_batches', 'train_stream',
]
