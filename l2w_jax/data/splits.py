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
# The training images thresholds are searched on when there are fewer of
# them than training images (eval.threshold_images; ImageNet: 50,000, the
# original `eval_imagenet.py`'s `train_set_index[-50000:]` of a saved
# random permutation) are drawn once, the same for every run.
THRESHOLD_SEED = 1
# LDAM-DRW's `rand_number`: the seed of its long-tailed CIFAR subset.
LONG_TAIL_SEED = 0
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


def threshold_subset(indices: np.ndarray, count: int,
                     seed: int = THRESHOLD_SEED) -> np.ndarray:
  """`count` of `indices` drawn uniformly at random with a fixed seed,
  sorted; all of them when `count` is 0 (or not smaller)."""
  indices = np.asarray(indices)
  if count <= 0 or count >= len(indices):
    return indices
  order = np.random.default_rng(seed).permutation(len(indices))
  return np.sort(indices[order[-count:]])


def long_tail_counts(num_classes: int, imbalance_factor: float,
                     max_per_class: int = CIFAR100_PER_CLASS) -> np.ndarray:
  """Images kept per class, exponential profile (Cui et al., CVPR 2019).

  n_c = int(max_per_class * (1 / imbalance_factor) ** (c / (C - 1))), in
  Python floats as LDAM-DRW's `IMBALANCECIFAR100.get_img_num_per_cls`
  (`imb_factor` there is 1 / imbalance_factor): the head class keeps
  `max_per_class`, the tail class max_per_class / imbalance_factor; 10,847
  images at factor 100. int64 (C,).
  """
  if imbalance_factor < 1:
    raise ValueError(f'dataset.imbalance_factor: must be >= 1, got '
                     f'{imbalance_factor}')
  ratio = 1.0 / float(imbalance_factor)
  return np.array([int(max_per_class * ratio ** (c / (num_classes - 1.0)))
                   for c in range(num_classes)], np.int64)


def long_tail_indices(labels: np.ndarray, num_classes: int,
                      imbalance_factor: float,
                      max_per_class: int = CIFAR100_PER_CLASS,
                      seed: int = LONG_TAIL_SEED) -> np.ndarray:
  """LDAM-DRW's `IMBALANCECIFAR100` subset (Cao et al., NeurIPS 2019).

  `np.random.seed(seed)`, then for every class c in ascending order: the
  positions of c in `labels`, shuffled by that one generator, of which the
  first n_c (`long_tail_counts`) are kept. With `labels` in the order of
  the CIFAR-100 python files (torchvision's), this is the published subset.

  Args:
    labels: int (N,), the training labels.
    num_classes: C.
    imbalance_factor: n_0 / n_{C-1}.
    max_per_class: n_0.
    seed: LDAM-DRW's `rand_number` (0 by default).

  Returns:
    int64 (sum n_c,): the kept positions, sorted. A class with fewer than
    n_c images keeps all of them (only mocked data has fewer than 500).
  """
  labels = np.asarray(labels)
  counts = long_tail_counts(num_classes, imbalance_factor, max_per_class)
  rng = np.random.RandomState(seed)
  kept = []
  for c, n_c in enumerate(counts):
    positions = np.flatnonzero(labels == c)
    rng.shuffle(positions)
    kept.append(positions[:n_c])
  return np.sort(np.concatenate(kept)).astype(np.int64)


LAST_BATCHES = ('keep', 'drop')


def check_last_batch(last_batch: str) -> str:
  """config.train.last_batch, or ValueError naming the field."""
  if last_batch not in LAST_BATCHES:
    raise ValueError(f'train.last_batch: must be one of {LAST_BATCHES}, got '
                     f'{last_batch!r}')
  return last_batch


def epoch_steps(num: int, global_batch_size: int, last_batch: str) -> int:
  """Iterations in an epoch of `num` examples.

  'keep' counts the last partial batch, as a DataLoader without drop_last
  (the originals): ceil(num / B). 'drop' counts full batches: num // B.
  """
  check_last_batch(last_batch)
  if last_batch == 'keep':
    return -(-num // global_batch_size)
  return num // global_batch_size


def last_batch_size(num: int, global_batch_size: int, last_batch: str,
                    num_devices: int) -> int:
  """Examples in the last global batch of an epoch.

  With 'keep', the R = num - (S - 1) * B examples left over, rounded up to a
  multiple of `num_devices` (and to at least 2 per device, for the two
  halves) by repeating the first examples of the epoch's order. That is
  DistributedSampler's padding (`indices += indices[:padding]`, up to a
  multiple of the replicas) when the devices are the GPUs: 8 devices on
  ImageNet at B = 4096 give 3,216 (3,215 images, one repeated), as the
  original's 8 GPUs do. 'drop': B.
  """
  if last_batch == 'drop':
    return global_batch_size
  steps = epoch_steps(num, global_batch_size, last_batch)
  left = num - (steps - 1) * global_batch_size
  size = -(-left // num_devices) * num_devices
  return min(max(size, 2 * num_devices), global_batch_size)


def epoch_batches(num: int, global_batch_size: int, seed: int, epoch: int,
                  start_step: int, process_index: int, process_count: int,
                  last_batch: str = 'drop', num_devices: int = 1,
                  dropped: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """This process's examples of one epoch, from batch `start_step` on.

  The epoch's permutation of `num` examples (without the `dropped` ones,
  bool (num,): records skipped as unreadable, taken out after the
  permutation so that the others keep their order), cut into global batches of
  `global_batch_size` (the last of `last_batch_size`: the remainder dropped,
  or kept and padded with the permutation's first examples); process p of P
  takes columns [p * b, (p + 1) * b) of every global batch, b = its size /
  P.

  Returns:
    (order, positions), both int64: which example (an index in [0, num)) and
    its position in the uninterrupted global epoch (step * global_batch_size
    + column), the key of its augmentation; this process's batches one after
    the other, (steps - start_step - 1) * B / P + last / P of them.
  """
  order = epoch_permutation(num, seed, epoch)
  if dropped is not None:
    order = order[~np.asarray(dropped, bool)[order]]
    num = len(order)
  steps = epoch_steps(num, global_batch_size, last_batch)
  last = last_batch_size(num, global_batch_size, last_batch, num_devices)
  size = (steps - 1) * global_batch_size + last
  order = np.concatenate([order, order[:max(size - num, 0)]])[:size]
  orders, positions = [], []
  for step in range(start_step, steps):
    width = global_batch_size if step < steps - 1 else last
    local = width // process_count
    columns = np.arange(process_index * local, (process_index + 1) * local)
    orders.append(order[step * global_batch_size + columns])
    positions.append(step * global_batch_size + columns)
  if not orders:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  return (np.concatenate(orders).astype(np.int64),
          np.concatenate(positions).astype(np.int64))
