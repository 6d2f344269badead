r"""Every training method on the same config, data and budget, over seeds.

  python -m benchmarks.compare_methods --config=configs/digits.py \
      --workdir=/tmp/l2w_compare --figure=docs/digits_methods.png

Trains `config` once per (method, seed) in `workdir/<method>/seed<k>` (a
run whose results.json exists is read, not retrained, so the command
resumes), then writes the mean ± std budgeted curves to `--figure` and
prints one JSON line: per method, test top-1 per exit (mean, std), the mean
over the 39 budgets of the budgeted top-1 (mean, std over seeds), MFLOPs
per exit and the seconds its runs took. Every method gets the config's
iterations (two-phase methods split them by train.phase_split).
"""

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from configs import common

from l2w_jax import paths
from l2w_jax.evaluation import comparison, plots
from l2w_jax.training import registry
from l2w_jax.training.train import finished_or_trained

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits.py')
_METHODS = flags.DEFINE_list('methods', None, 'Methods to compare (default: '
                             'every registered one).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'config.seed values.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/l2w_compare', 'Runs go here.')
_FIGURE = flags.DEFINE_string('figure', 'methods_budgeted.png', 'Figure.')


def _run(config, method: str, seed: int, workdir: str) -> tuple[dict, float]:
  """results.json of one run (trained unless it exists), and its seconds."""
  config = config.copy_and_resolve_references()
  config.method = method
  config.seed = seed
  results, seconds = finished_or_trained(config, workdir)
  return results, seconds or 0.0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.ERROR)
  names = _METHODS.value or list(registry.available())
  for name in names:
    registry.get(name)  # an unknown name stops before any training
  seeds = [int(s) for s in _SEEDS.value]
  config = common.config_from_flag(_CONFIG)
  summaries, out = [], {'seeds': seeds}
  for name in names:
    runs, seconds = [], 0.0
    for seed in seeds:
      results, took = _run(config, name, seed,
                           paths.join(_WORKDIR.value, name, f'seed{seed}'))
      runs.append(results)
      seconds += took
    summary = comparison.summarise_seeds(runs, name)
    summaries.append(summary)
    budget_means = [np.mean([r['test_top1'] for r in run['budgeted']])
                    for run in runs]
    out[name] = {
        'top1_per_exit_mean': [round(float(v), 2) for v in summary.exit_top1],
        'top1_per_exit_std': [round(float(v), 2)
                              for v in summary.exit_top1_std],
        'budgeted_top1_mean': round(float(np.mean(budget_means)), 2),
        'budgeted_top1_std': round(float(np.std(budget_means)), 2),
        'mflops_per_exit': [round(float(v), 3) for v in summary.exit_mflops],
        'iterations': runs[0]['iterations'],
        'seconds_trained': round(seconds, 1),
    }
  plots.plot_seed_summaries(summaries, _FIGURE.value,
                            title=f'{runs[0]["dataset"]}: {len(seeds)} seeds '
                            'per method')
  print(json.dumps(out))


if __name__ == '__main__':
  app.run(main)
