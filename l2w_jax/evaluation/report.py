"""Evaluating a trained multi-exit model as the papers report it, and
writing the results (results.json, budgeted.png) of a run."""

from __future__ import annotations

import functools
import json

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

RESULTS_FILE = 'results.json'
PLOT_FILE = 'budgeted.png'


def jitted_statistics(model, mesh=None):
  """f(variables, images, labels) -> per-batch exit statistics, jitted once.

  With a mesh, every process passes the whole batch (numpy, a multiple of the
  device count); each device evaluates its rows and the (K, B) statistics
  come back replicated, so every process can read them.
  """
  stats = functools.partial(anytime.exit_statistics, model)
  if mesh is None:
    return jax.jit(stats)
  sharded = jax.jit(
      jax.shard_map(stats, mesh=mesh, in_specs=(P(), P(DATA_AXIS),
                                                P(DATA_AXIS)),
                    out_specs=P(None, DATA_AXIS), check_vma=False),
      out_shardings=parallel.replicated(mesh))

  def on_mesh(variables, images, labels):
    return sharded(variables, parallel.global_from_full(images, mesh),
                   parallel.global_from_full(labels, mesh))

  return on_mesh


def threshold_outputs(config, stats) -> anytime.ExitOutputs:
  """Outputs on the split thresholds are searched on (eval.threshold_source):
  the held-out part, or the augmented training set as the original L2W-DEN."""
  batch = config.eval.batch_size
  if config.eval.threshold_source == 'holdout':
    return anytime.collect(stats, data.eval_batches(config, 'holdout', batch))
  return anytime.collect(stats, data.eval_batches(config, 'train', batch,
                                                  augment=True))


def evaluate_model(config, model, variables, info, statistics=None) -> dict:
  """Anytime top-1/top-5 on test and the 39-budget curve: a results dict.

  `statistics` is `jitted_statistics(model)` if the caller already has it.
  """
  stats = functools.partial(statistics or jitted_statistics(model), variables)
  test = anytime.collect(stats, data.eval_batches(config, 'test',
                                                  config.eval.batch_size))
  held_out = threshold_outputs(config, stats)
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
      'threshold_source': config.eval.threshold_source,
      'num_test': test.num_samples,
      'num_threshold_samples': held_out.num_samples,
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
