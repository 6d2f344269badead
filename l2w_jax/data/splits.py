"""Which examples each split holds and in which order an epoch visits them.

Pure numpy on indices into a tfds split, so that the choices are easy to
check: the held-out threshold split, the long-tailed CIFAR-100 subset, the
per-epoch permutation and its per-process slices, and the seeds derived from
(config.seed, epoch).
"""

from __future__ import annotations

import numpy as np

# The holdout never depends on config.seed: every run of every method
# thresholds on the same images (MSDNet's --use-valid draws it once and saves
# it; here it is simply fixed).
HOLDOUT_SEED = 0
# Training images per class of CIFAR-100 (the head class of CIFAR-100-LT).
CIFAR100_PER_CLASS = 500

# Tags that keep the seed streams derived from (seed, epoch) apart.
PERMUTATION_TAG = 0
AUGMENT_TAG = 1
FILE_SHUFFLE_TAG = 2
BUFFER_SHUFFLE_TAG = 3
EVAL_AUGMENT_TAG = 4


def seed_words(*words: int, num: int = 2) -> np.ndarray:
  """`num` int64 values in [0, 2**32) derived from non-negative `words`.

  numpy's SeedSequence hashes the words, so (seed, epoch, tag) tuples that
  differ anywhere give unrelated seeds. (2,) is the shape of a TF stateless
  seed.
  """
  if any(int(w) < 0 for w in words):
    raise ValueError(f'seeds and epochs must be >= 0, got {words}')
  state = np.random.SeedSequence([int(w) for w in words]).generate_state(
      num, np.uint32)
  return state.astype(np.int64)


def epoch_permutation(num: int, seed: int, epoch: int) -> np.ndarray:
  """The order in which epoch `epoch` visits `num` examples: int64 (num,)."""
  rng = np.random.default_rng(
      np.random.SeedSequence([seed, epoch, PERMUTATION_TAG]))
  return rng.permutation(num)


def holdout_split(indices: np.ndarray, holdout: int,
                  seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Splits `indices` into (train, holdout), each sorted.

  The holdout is a uniformly random subset of size `holdout` drawn with a
  fixed seed (the last `holdout` of a permutation, as MSDNet's
  `train_set_index[-5000:]`); the rest trains.
  """
  indices = np.asarray(indices)
  if not 0 <= holdout < len(indices):
    raise ValueError(f'dataset.holdout: must be in [0, {len(indices)}) for '
                     f'{len(indices)} training images, got {holdout}')
  order = np.random.default_rng(seed).permutation(len(indices))
  cut = len(indices) - holdout
  return np.sort(indices[order[:cut]]), np.sort(indices[order[cut:]])


def long_tail_counts(num_classes: int, imbalance_factor: float,
                     max_per_class: int = CIFAR100_PER_CLASS) -> np.ndarray:
  """Images kept per class, exponential profile (Cui et al., CVPR 2019).

  n_c = floor(max_per_class * (1 / imbalance_factor) ** (c / (C - 1))): the
  head class keeps `max_per_class`, the tail class max_per_class /
  imbalance_factor. int64 (C,).
  """
  if imbalance_factor < 1:
    raise ValueError(f'dataset.imbalance_factor: must be >= 1, got '
                     f'{imbalance_factor}')
  classes = np.arange(num_classes, dtype=np.float64)
  fractions = (1.0 / imbalance_factor) ** (classes / (num_classes - 1))
  return np.floor(max_per_class * fractions).astype(np.int64)


def long_tail_indices(labels: np.ndarray, num_classes: int,
                      imbalance_factor: float,
                      max_per_class: int = CIFAR100_PER_CLASS) -> np.ndarray:
  """The first n_c images of each class c (in `labels` order), sorted.

  A class with fewer than n_c images keeps all of them; CIFAR-100 has 500 of
  every class, so that happens only with mocked data.
  """
  labels = np.asarray(labels)
  counts = long_tail_counts(num_classes, imbalance_factor, max_per_class)
  kept = [np.flatnonzero(labels == c)[:n_c] for c, n_c in enumerate(counts)]
  return np.sort(np.concatenate(kept))


def epoch_batches(num: int, global_batch_size: int, seed: int, epoch: int,
                  start_step: int, process_index: int,
                  process_count: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's examples of one epoch, from batch `start_step` on.

  The epoch's permutation of `num` examples, cut into full global batches
  (the remainder dropped); process p of P takes columns
  [p * B, (p + 1) * B) of every global batch, B = global_batch_size / P.

  Returns:
    (order, positions), both int64 ((steps - start_step) * B,): which example
    (an index in [0, num)) and its position in the uninterrupted global epoch
    (step * global_batch_size + column), the key of its augmentation.
  """
  local = global_batch_size // process_count
  steps = num // global_batch_size
  order = epoch_permutation(num, seed, epoch)[:steps * global_batch_size]
  order = order.reshape(steps, global_batch_size)
  columns = np.arange(process_index * local, (process_index + 1) * local)
  positions = (np.arange(steps)[:, None] * global_batch_size + columns[None])
  return (order[start_step:, columns].reshape(-1),
          positions[start_step:].reshape(-1))
