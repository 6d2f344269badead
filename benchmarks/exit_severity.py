r"""Which exits the hard images of graded_digits take: for each run of the
demo, the test images leaving at each exit at one budget and their mean
severity, and top-1 of the first and last exit per severity third.

  python -m benchmarks.exit_severity --workdir=workdir/demo --budget_index=10

Reads the runs `experiments.demo` trained in <workdir>/<method> (their
newest checkpoints), evaluates them on the held-out and test splits and
prints one JSON line.
"""

import json

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from configs import graded_digits as graded_config
from l2w_jax.evaluation import budgeted, report
from l2w_jax.training.learner import build_learner
from l2w_jax.training.workdir import restore_variables

_WORKDIR = flags.DEFINE_string('workdir', 'workdir/demo', 'The demo\'s runs.')
_METHODS = flags.DEFINE_list('methods', ['l2w', 'uniform'], 'Runs to read.')
_BUDGET = flags.DEFINE_integer('budget_index', 10, 'Budget (1..39).')
THIRDS = ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0))


def test_severities(config) -> np.ndarray:
  """Severity of every test image, in the order `eval_batches` serves them."""
  builder = tfds.builder('graded_digits', data_dir=config.dataset.data_dir)
  split = builder.as_dataset(split='test', batch_size=-1, shuffle_files=False)
  return tfds.as_numpy(split)['severity']


def summarise(config, workdir: str, budget_index: int) -> dict:
  """Exit counts and mean severity per exit at the budget, and first / last
  exit top-1 (%) per severity third, of the run in `workdir`."""
  variables, _ = restore_variables(config, workdir)
  statistics = report.jitted_statistics(build_learner(config).model)
  test = statistics.outputs(config, variables, 'test')
  held_out = report.threshold_outputs(config, statistics, variables)
  severity = test_severities(config)
  num_exits = test.confidence.shape[0]
  thresholds = budgeted.find_thresholds(
      held_out.confidence,
      budgeted.budget_proportions(num_exits)[budget_index - 1])
  exits = budgeted.exit_indices(test.confidence, thresholds)
  thirds = []
  for low, high in THIRDS:
    chosen = (severity >= low) & ((severity < high) | (high == 1.0))
    thirds.append({'severity': [round(low, 3), round(high, 3)],
                   'images': int(chosen.sum()),
                   'exit1_top1': round(100 * float(test.top1[0][chosen].mean()),
                                       2),
                   'last_exit_top1': round(
                       100 * float(test.top1[-1][chosen].mean()), 2)})
  return {'exit_counts': np.bincount(exits, minlength=num_exits).tolist(),
          'mean_severity_per_exit': [round(float(severity[exits == k].mean()),
                                           3) for k in range(num_exits)],
          'by_severity': thirds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.ERROR)
  row = {'budget_index': _BUDGET.value}
  for method in _METHODS.value:
    config = graded_config.get_config()
    config.method = method
    row[method] = summarise(config, f'{_WORKDIR.value}/{method}',
                            _BUDGET.value)
  print(json.dumps(row), flush=True)


if __name__ == '__main__':
  app.run(main)
