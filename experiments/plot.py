r"""Overlays the accuracy-MFLOPs curves of several runs on one figure.

  python -m experiments.plot --workdirs=/tmp/l2w,/tmp/uniform \
      --labels=L2W,Uniform --out=/tmp/l2w_vs_uniform.png

Each workdir needs a results.json (written at the end of training or by
experiments.evaluate).
"""

import json

from absl import app
from absl import flags

from l2w_jax import paths
from l2w_jax.evaluation import plots
from l2w_jax.evaluation.report import RESULTS_FILE

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Runs to overlay.')
_LABELS = flags.DEFINE_list('labels', None, 'One label per run (default: '
                            'the method of each run).')
_OUT = flags.DEFINE_string('out', 'budgeted_comparison.png', 'Figure path '
                           '(.png or .pdf).')
_TITLE = flags.DEFINE_string('title', '', 'Figure title.')
flags.mark_flag_as_required('workdirs')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  labels = _LABELS.value or [None] * len(_WORKDIRS.value)
  if len(labels) != len(_WORKDIRS.value):
    raise app.UsageError(f'{len(labels)} labels for '
                         f'{len(_WORKDIRS.value)} workdirs')
  try:
    paths.check_writable(_OUT.value, 'cannot write the figure to')
  except paths.UnsupportedPath as e:
    raise app.UsageError(str(e)) from None
  curves = []
  for workdir, label in zip(_WORKDIRS.value, labels):
    path = paths.join(workdir, RESULTS_FILE)
    if not paths.exists(path):
      raise app.UsageError(f'no {RESULTS_FILE} in {workdir}: train it or run '
                           'experiments.evaluate first')
    results = json.loads(paths.read_text(path))
    curves.append(plots.curve_from_results(
        results, label or results.get('method', workdir).upper()))
  plots.plot_budgeted(curves, _OUT.value, title=_TITLE.value)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
