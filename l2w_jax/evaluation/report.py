"""Evaluating a trained multi-exit model as the papers report it, and
writing the results (results.json, budgeted.png) of a run."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable

import jax
from jax.sharding import PartitionSpec as P
import numpy as np

from l2w_jax import data
from l2w_jax import parallel
from l2w_jax import paths
from l2w_jax.evaluation import anytime, budgeted, plots
from l2w_jax.evaluation.fingerprint import params_sha256
from l2w_jax.evaluation.flops import count_per_exit
from l2w_jax.models import DATA_AXIS
from l2w_jax.models.inputs import model_input

RESULTS_FILE = 'results.json'
PLOT_FILE = 'budgeted.png'


@dataclasses.dataclass(frozen=True)
class ExitStatistics:
  """A model's jitted per-batch exit statistics and the evaluation batches
  they take.

  `fn(variables, batch) -> dict` of (K, B) arrays (`anytime.exit_statistics`)
  readable on this host, plus the global 'label' and 'mask' (B,) when each
  process passes only its rows. `process_index` / `process_count` /
  `as_bytes` say which batches `data.eval_batches` must serve it.
  """
  fn: Callable
  process_index: int = 0
  process_count: int = 1
  as_bytes: bool = False

  def batches(self, config, split: str, *, augment: bool = False):
    """`split` in batches of config.eval.batch_size, as `fn` takes them."""
    return data.eval_batches(config, split, config.eval.batch_size,
                             augment=augment,
                             process_index=self.process_index,
                             process_count=self.process_count,
                             as_bytes=self.as_bytes)

  def outputs(self, config, variables, split: str, *,
              augment: bool = False) -> anytime.ExitOutputs:
    """Every exit's outputs on `split` (see `anytime.collect`)."""
    return anytime.collect(functools.partial(self.fn, variables),
                           self.batches(config, split, augment=augment))


def jitted_statistics(model, mesh=None,
                      input_norm: tuple | None = None) -> ExitStatistics:
  """The exit statistics of `model`, jitted once.

  Without a mesh: one device, whole float32 batches. With a mesh: every
  process passes only its rows of each global batch (a multiple of the
  device count), as uint8 when `input_norm` = (mean, std) is given (then
  normalised on the devices as the training step does); each device
  evaluates its rows and the (K, B) statistics, labels and mask come back
  whole on every process.
  """
  stats = functools.partial(anytime.exit_statistics, model)
  if mesh is None:
    jitted = jax.jit(stats)
    return ExitStatistics(
        lambda variables, batch: jitted(variables, batch['image'],
                                        batch['label']))
  mean, std = input_norm if input_norm is not None else (None, None)

  def per_device(variables, images, labels, mask):
    out = stats(variables, model_input(images, mean, std), labels)
    return out, labels, mask

  sharded = jax.jit(
      jax.shard_map(per_device, mesh=mesh,
                    in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
                    out_specs=(P(None, DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
                    check_vma=False),
      out_shardings=parallel.replicated(mesh))

  def on_mesh(variables, batch):
    out, labels, mask = sharded(
        variables, *(parallel.global_array(np.asarray(batch[key]), mesh)
                     for key in ('image', 'label', 'mask')))
    return {**out, 'label': labels, 'mask': mask}

  return ExitStatistics(on_mesh, jax.process_index(), jax.process_count(),
                        as_bytes=input_norm is not None)


def threshold_outputs(config, statistics: ExitStatistics,
                      variables) -> anytime.ExitOutputs:
  """Outputs on the split thresholds are searched on (eval.protocol): the
  held-out images (MSDNet), or the training images, all of them or
  eval.threshold_images (L2W-DEN); with the training augmentation unless
  eval.threshold_augment is False."""
  augment = bool(config.eval.get('threshold_augment', True))
  split = 'holdout' if config.eval.protocol == 'holdout' else 'thresholds'
  return statistics.outputs(config, variables, split, augment=augment)


def evaluate_model(config, model, variables, info, statistics=None) -> dict:
  """Anytime top-1/top-5 on test and the 39-budget curve: a results dict.

  `statistics`: `jitted_statistics(model)` (the default) or the caller's
  (e.g. on a mesh).
  """
  statistics = statistics or jitted_statistics(model)
  test = statistics.outputs(config, variables, 'test')
  held_out = threshold_outputs(config, statistics, variables)
  flops, _ = count_per_exit(model, info.image_shape)
  curve = budgeted.budgeted_evaluation(
      held_out.confidence, held_out.prediction, held_out.labels,
      test.confidence, test.prediction, test.labels, np.asarray(flops))
  return {
      'anytime': {'top1': [float(a) for a in test.top1_accuracy()],
                  'top5': [float(a) for a in test.top5_accuracy()]},
      'budgeted': curve.rows(),
      'mflops_per_exit': [f / 1e6 for f in flops],
      'params_sha256': params_sha256(variables['params'],
                                     variables['batch_stats']),
      'method': config.method,
      'dataset': info.name,
      'threshold_source': config.eval.protocol,
      'num_test': test.num_samples,
      'num_threshold_samples': held_out.num_samples,
      # Records left out as unreadable (config.dataset.skip_corrupt).
      'skipped_records': {'count': len(info.skipped),
                          'records': list(info.skipped)},
  }


def write_results(results: dict, directory: str, label: str,
                  title: str) -> None:
  """results.json and budgeted.png in `directory` (a local path or a gs://
  URL), each written whole (`paths.write_atomic`: a crash never leaves a
  partial results.json, which would mark the run finished); prints a
  summary."""
  paths.makedirs(directory)
  results_path = paths.join(directory, RESULTS_FILE)
  paths.write_atomic(results_path, json.dumps(results, indent=1))
  plots.plot_budgeted([plots.curve_from_results(results, label)],
                      paths.join(directory, PLOT_FILE), title=title)
  accs = ' '.join(f'{a:.2f}' for a in results['anytime']['top1'])
  print(f'test top-1 per exit: {accs}', flush=True)
  print(f'results in {results_path}', flush=True)
