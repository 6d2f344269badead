"""`Predictor`: early-exit prediction from an exported artifact, no TensorFlow.

  predictor = Predictor.load('/tmp/digits_model')
  out = predictor(predictor.normalize(uint8_images), budget=20)
  out.labels, out.exits, out.mflops    # (N,) each: class, exit (0-based), cost

A budget is one of the run's 39 budgeted-evaluation rows: its thresholds
(searched on the threshold split) decide where each sample leaves, and
`max_mflops=` picks the row with the best held-out top-1 among those whose
expected MFLOPs (on the test set) fit. Prediction runs the real cascade
(`l2w_jax.evaluation.cascade.Cascade`: later blocks only see the samples
still unsure), which gives simulated exiting's predictions and exits, so on
the test set the accuracy and exit counts are those of results.json.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax.evaluation import anytime, cascade
from l2w_jax.serving import artifact as artifact_lib
from l2w_jax.training.learner import method_model

DEFAULT_MAX_BATCH = 64


@dataclasses.dataclass(frozen=True)
class Budget:
  """One row of the run's budgeted evaluation (`index` 1..39)."""
  index: int
  thresholds: tuple[float, ...]
  mflops: float
  val_top1: float
  test_top1: float
  test_exit_counts: tuple[int, ...]


@dataclasses.dataclass
class Prediction:
  """Per sample (N,): predicted class, exit left at (0-based) and MFLOPs
  spent (everything up to and including that exit); `budget` is the budget
  index used."""
  labels: np.ndarray
  exits: np.ndarray
  mflops: np.ndarray
  budget: int


def budgets_from_rows(rows: list[dict]) -> tuple[Budget, ...]:
  """Budget records from serving.json's rows.

  Args:
    rows: serving.json's `budgets`, dicts with `budget_index`, `thresholds`
      (K,), `mflops`, `val_top1`, `test_top1`, `test_exit_counts` (K,).

  Returns:
    one `Budget` per row, in the rows' order.
  """
  return tuple(Budget(index=int(r['budget_index']),
                      thresholds=tuple(float(t) for t in r['thresholds']),
                      mflops=float(r['mflops']),
                      val_top1=float(r['val_top1']),
                      test_top1=float(r['test_top1']),
                      test_exit_counts=tuple(int(c)
                                             for c in r['test_exit_counts']))
               for r in rows)


def most_accurate_within(budgets, max_mflops: float) -> int:
  """The most accurate budget that fits a cost.

  Args:
    budgets: `Budget` records.
    max_mflops: the highest expected MFLOPs per image allowed.

  Returns:
    the index (1-based) of the budget with the best held-out top-1 among
    those whose expected MFLOPs are <= max_mflops (ties: the cheaper, then
    the lower index).

  Raises:
    ValueError: no budget fits.
  """
  fitting = [b for b in budgets if b.mflops <= max_mflops]
  if not fitting:
    cheapest = min(budgets, key=lambda b: b.mflops)
    raise ValueError(f'no budget costs at most {max_mflops} MFLOPs (the '
                     f'cheapest, budget {cheapest.index}, costs '
                     f'{cheapest.mflops:.6g}): raise max_mflops')
  return min(fitting, key=lambda b: (-b.val_top1, b.mflops, b.index)).index


class Predictor:
  """Early-exit prediction with the thresholds of a run's budgets.

  Models the real cascade runs stage by stage (every `MultiExitBackbone`,
  with or without an ensemble carry) exit for real, a single image in one
  program with the exits decided on the device (`SingleImageCascade`). For
  the others (heads that read earlier heads' outputs, which `Cascade`
  refuses) every exit is computed and the exits are simulated afterwards
  (`budgeted.exit_indices`), which gives the same labels, exits and MFLOPs
  accounting without the saving in compute (`uses_cascade` is False and
  `fallback_reason` says why).

  Calls are serialised by a lock: the cascade is shared between budgets and
  its thresholds are set for each call.

  Args:
    artifact: a read artifact (`artifact.read_artifact`).
    max_batch: images per program call; larger batches go in chunks.
    where: how error messages name the artifact.
    variables_as_constants: the cascade's programs hold the variables as
      constants (fastest; one copy of a stage's weights per bucket), or take
      them per call.

  Attributes:
    image_shape: (H, W, C) of the images it takes.
    budgets: K-threshold `Budget` records, index 1..39.
    mflops_per_exit: (K,) the MFLOPs spent by a sample leaving at each exit.
    num_exits: K.
  """

  def __init__(self, artifact: artifact_lib.Artifact,
               max_batch: int = DEFAULT_MAX_BATCH, where: str = 'artifact',
               variables_as_constants: bool = True):
    if isinstance(max_batch, bool) or not isinstance(
        max_batch, numbers.Integral) or max_batch < 1:
      raise ValueError(f'max_batch must be a positive integer, got '
                       f'{max_batch!r}')
    serving = artifact.serving
    self.config = artifact.config
    self.method = serving['method']
    self.image_shape = tuple(int(d) for d in serving['image_shape'])
    self.mean = tuple(float(m) for m in serving['mean'])
    self.std = tuple(float(s) for s in serving['std'])
    self.eval_transform = serving.get('eval_transform', 'none')
    self.mflops_per_exit = np.asarray(serving['mflops_per_exit'], np.float64)
    self.budgets = budgets_from_rows(serving['budgets'])
    self.params_sha256 = serving['params_sha256']
    self.max_batch = int(max_batch)
    self.model = method_model(self.config)
    self.num_exits = int(self.model.num_exits)
    if len(self.mflops_per_exit) != self.num_exits:
      raise ValueError(f'{where}: {len(self.mflops_per_exit)} MFLOPs figures '
                       f'for a model with {self.num_exits} exits; re-export '
                       f'it with {artifact_lib.EXPORT_HINT}')
    artifact_lib.check_variables(self.model, artifact.variables,
                                 self.image_shape, where)
    self.variables = jax.device_put(artifact.variables)
    self._lock = threading.Lock()
    try:
      self._cascade = cascade.Cascade(
          self.model, self.variables, self._thresholds(1), self.max_batch,
          variables_as_constants=variables_as_constants)
      self._as_constants = variables_as_constants
      self.fallback_reason = None
      self._single = None  # the latency program, built on the first image
    except ValueError as e:  # a model the real cascade cannot stage
      self._cascade = None
      self.fallback_reason = str(e)
      self._all_exits = jax.jit(
          lambda v, x: anytime.exit_statistics(
              self.model, v, x, jnp.zeros((x.shape[0],), jnp.int32)))

  @classmethod
  def load(cls, path: str, max_batch: int = DEFAULT_MAX_BATCH,
           variables_as_constants: bool = True) -> Predictor:
    """The predictor of an artifact directory.

    Args:
      path: a directory written by `write_artifact` (`python -m
        experiments.export`), local or `gs://`.
      max_batch: images per program call; larger batches go in chunks.
      variables_as_constants: see the class docstring.

    Returns:
      the `Predictor`.
    """
    return cls(artifact_lib.read_artifact(path), max_batch,
               where=os.fspath(path),
               variables_as_constants=variables_as_constants)

  @property
  def uses_cascade(self) -> bool:
    """Whether prediction skips work (the real cascade) or simulates it."""
    return self._cascade is not None

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """Normalises images as the evaluation pipeline does.

    Args:
      images: uint8 (N, H, W, C), already at `image_shape`.

    Returns:
      float32 (N, H, W, C): (x / 255 - mean) / std per channel.
    """
    return artifact_lib.normalize(images, self.mean, self.std)

  def budget_for(self, max_mflops: float) -> int:
    """The budget index (1-based) `max_mflops=` picks
    (`most_accurate_within`)."""
    return most_accurate_within(self.budgets, float(max_mflops))

  def _budget_index(self, budget, max_mflops) -> int:
    if (budget is None) == (max_mflops is None):
      raise ValueError('give exactly one of budget= (an index in '
                       f'1..{len(self.budgets)}) and max_mflops=')
    if max_mflops is not None:
      return self.budget_for(max_mflops)
    if (isinstance(budget, bool) or not isinstance(budget, numbers.Integral)
        or not 1 <= budget <= len(self.budgets)):
      raise ValueError(f'budget must be a budget index in '
                       f'1..{len(self.budgets)}, got {budget!r}; '
                       'predictor.budgets lists their MFLOPs and accuracies')
    return int(budget)

  def _thresholds(self, index: int) -> np.ndarray:
    return np.asarray(self.budgets[index - 1].thresholds, np.float32)

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
      raise ValueError('got uint8 images: normalise them first with '
                       'predictor.normalize(images)')
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(f'images must have shape (N, '
                       f'{", ".join(map(str, self.image_shape))}), got '
                       f'{images.shape}; resize them as the run\'s dataset '
                       'pipeline does')
    if images.dtype != np.float32:
      raise ValueError(f'images must be float32 (normalised like the '
                       f'evaluation pipeline), got {images.dtype}; cast '
                       'them with images.astype(np.float32)')
    return images

  def _chunk(self, images: np.ndarray,
             thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and exits of at most max_batch images."""
    if self._cascade is not None and images.shape[0] == 1:
      # One image: the whole cascade in one program, exits decided on the
      # device (no host round trip between stages).
      if self._single is None:
        self._single = cascade.SingleImageCascade(
            self.model, self.variables, thresholds,
            variables_as_constants=self._as_constants)
      self._single.thresholds = thresholds
      label, exit_index = self._single(images)
      return np.asarray(label)[None], np.asarray(exit_index)[None]
    if self._cascade is not None:
      self._cascade.thresholds = thresholds
      out = self._cascade(images)
      return np.asarray(out.predictions), np.asarray(out.exits)
    n = images.shape[0]
    size = next(b for b in cascade.bucket_sizes(self.max_batch) if b >= n)
    padded = np.concatenate(
        [images, np.zeros((size - n,) + images.shape[1:], images.dtype)])
    stats = self._all_exits(self.variables, padded)
    return cascade.simulated_exits(np.asarray(stats['confidence'])[:, :n],
                                   np.asarray(stats['prediction'])[:, :n],
                                   thresholds)

  def __call__(self, images, budget: int | None = None, *,
               max_mflops: float | None = None) -> Prediction:
    """Predicts with early exits.

    Args:
      images: float32 (N, H, W, C), normalised (`normalize`).
      budget: a budget index, 1..39; give this or `max_mflops`.
      max_mflops: use the most accurate budget whose expected MFLOPs per
        image fit.

    Returns:
      `Prediction`: labels (N,) int64, exits (N,) int64 (0-based), mflops
      (N,) float64, and the budget index used.
    """
    index = self._budget_index(budget, max_mflops)
    images = self._check_images(images)
    thresholds = self._thresholds(index)
    labels, exits = [], []
    with self._lock:
      for start in range(0, images.shape[0], self.max_batch):
        chunk_labels, chunk_exits = self._chunk(
            images[start:start + self.max_batch], thresholds)
        labels.append(np.asarray(chunk_labels, np.int64))
        exits.append(np.asarray(chunk_exits, np.int64))
    labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    exits = np.concatenate(exits) if exits else np.zeros((0,), np.int64)
    return Prediction(labels=labels, exits=exits,
                      mflops=self.mflops_per_exit[exits], budget=index)
