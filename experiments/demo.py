r"""The demo: L2W-DEN beside uniform weighting, one table and one figure.

  python3 quickstart.py demo
  # = python -m experiments.demo --workdir=workdir/demo

Trains `--config` (default configs/graded_digits.py) once per method of
`--methods` (l2w, then uniform: the same seed, data order and iterations)
in <workdir>/<method>. A run whose results.json exists is read back, so a
rerun only redraws; an interrupted run resumes. Then prints each method's
test top-1 per exit and the exit-1 to exit-K gap, a table of budgeted
top-1 against MFLOPs at `--table_budgets`, and writes the figure
(<workdir>/demo.png, or `--figure`): budgeted curves, anytime accuracy per
exit and where test images exit at `--budget_index`.

The README's figure and table come from
  python -m experiments.demo --workdir=/tmp/demo --figure=docs/demo.png
"""

import time

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/graded_digits.py', 'Experiment config file.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'workdir/demo', 'One run per '
                               'method goes in <workdir>/<method>.')
_METHODS = flags.DEFINE_list('methods', ['l2w', 'uniform'], 'Training '
                             'methods (config.method values), in order.')
_FIGURE = flags.DEFINE_string('figure', None, 'Figure path (default '
                              '<workdir>/demo.png).')
_BUDGET = flags.DEFINE_integer('budget_index', 10, 'Budget (1..39) whose '
                               'exit distribution the figure shows.')
_TABLE = flags.DEFINE_list('table_budgets', ['1', '5', '10', '15', '20', '30',
                                             '39'], 'Budgets (1..39) of the '
                           'printed table.')


def run_method(config, method: str, workdir: str) -> tuple[dict, float]:
  """results.json of `config` trained with `method` in `workdir` (trained or
  resumed unless results.json exists), and the seconds it took (0: read)."""
  from l2w_jax.training.train import finished_or_trained  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.method = method
  results, seconds = finished_or_trained(config, workdir)
  if seconds is None:
    print(f'{method}: read {workdir}/results.json (delete {workdir} to train '
          'it again)', flush=True)
  return results, seconds or 0.0


def budget_table(runs: list[tuple[str, dict]], budgets: list[int]) -> str:
  """A plain-text table: one row per budget index, MFLOPs and test top-1 of
  every run (runs: [(label, results.json dict)])."""
  head = ['budget'] + [f'{label} {what}' for label, _ in runs
                       for what in ('MFLOPs', 'top-1')]
  rows = []
  for budget in budgets:
    row = [str(budget)]
    for _, results in runs:
      entry = next(r for r in results['budgeted']
                   if r['budget_index'] == budget)
      row += [f"{entry['mflops']:.2f}", f"{entry['test_top1']:.2f}"]
    rows.append(row)
  widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(r, widths))
           for r in [head] + rows]
  return '\n'.join(lines)


def exit_summary(label: str, results: dict) -> str:
  """'<label>: test top-1 per exit a b c d (exit 1 -> exit K: +g points)'."""
  top1 = results['anytime']['top1']
  accs = ' '.join(f'{a:.2f}' for a in top1)
  return (f'{label}: test top-1 per exit {accs} (exit 1 -> exit '
          f'{len(top1)}: {top1[-1] - top1[0]:+.2f} points)')


def main(argv):
  cli.start_quietly(argv)
  budgets = [int(b) for b in _TABLE.value] + [_BUDGET.value]
  if any(not 1 <= b <= 39 for b in budgets):
    cli.exit_with_message(f'error: budgets must be in 1..39, got {budgets}',
                          1)
  from l2w_jax.data import CorruptRecordError  # pylint: disable=g-import-not-at-top
  from l2w_jax.data import DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  from l2w_jax import paths  # pylint: disable=g-import-not-at-top
  from l2w_jax.evaluation import plots  # pylint: disable=g-import-not-at-top
  from l2w_jax.training import registry  # pylint: disable=g-import-not-at-top
  from l2w_jax.training.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from l2w_jax.training.divergence import TrainingDiverged  # pylint: disable=g-import-not-at-top
  from l2w_jax.training.workdir import WorkdirError  # pylint: disable=g-import-not-at-top
  from l2w_jax.accelerators import PlatformError  # pylint: disable=g-import-not-at-top

  config = common.config_from_flag(_CONFIG)
  start = time.perf_counter()
  runs, seconds = [], {}
  run_dir = _WORKDIR.value  # the one being written, for a full disk
  try:
    for method in _METHODS.value:
      registry.get(method)  # an unknown name stops before any training
    if _FIGURE.value:  # before any training, like the workdir's scheme
      paths.check_writable(_FIGURE.value, 'cannot write the figure to')
    for i, method in enumerate(_METHODS.value):
      print(f'== {i + 1}/{len(_METHODS.value)}: {method} ==', flush=True)
      run_dir = paths.join(_WORKDIR.value, method)
      results, seconds[method] = run_method(config, method, run_dir)
      if 'interrupted_at' in results:  # SIGTERM / Ctrl-C: saved, stop here
        cli.exit_with_message(
            f'{method}: interrupted at iteration {results["interrupted_at"]}'
            ' (checkpoint saved); rerun the same command to resume', 0)
      runs.append((method, results))
  except (CorruptRecordError, DatasetNotFoundError, CheckpointError,
          PlatformError, TrainingDiverged, WorkdirError, KeyError,
          ValueError) as e:
    cli.exit_with_message(f'error: {e}', 1)
  except KeyboardInterrupt:
    cli.exit_with_message('interrupted; rerun the same command to resume',
                          130)
  except OSError as e:  # a full disk or quota while a run writes
    cli.exit_with_message(cli.os_error_line(e, run_dir), 1)
  figure = paths.absolute(_FIGURE.value or
                          paths.join(_WORKDIR.value, 'demo.png'))
  try:
    paths.makedirs(paths.split(figure)[0])
    plots.plot_method_comparison(
        runs, figure, _BUDGET.value,
        title=f'{" vs ".join(_METHODS.value)} on {config.dataset.name}: '
              f'{runs[0][1]["iterations"]} iterations each, seed '
              f'{config.seed}, {runs[0][1]["num_test"]} test images')
  except OSError as e:  # the figure is written in one piece, or not at all
    cli.exit_with_message(
        f'error: {cli.one_line(e)}; the runs in {_WORKDIR.value} are '
        'finished and kept: rerun the same command to draw it', 1)
  print(flush=True)
  for label, results in runs:
    print(exit_summary(label, results))
  print('\nbudgeted top-1 (%) on the test split against average MFLOPs:')
  print(budget_table(runs, [int(b) for b in _TABLE.value]))
  trained = ', '.join(f'{m} {s:.0f} s' for m, s in seconds.items() if s)
  print(f'\nfigure: {figure}')
  print(f'total {time.perf_counter() - start:.0f} s'
        + (f' (training and evaluation: {trained})' if trained else ''),
        flush=True)


if __name__ == '__main__':
  app.run(main)
