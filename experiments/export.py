r"""Exports an evaluated run as a served-model artifact (`l2w_jax.serving`).

  python -m experiments.evaluate --config=configs/digits.py --workdir=workdir/digits
  python -m experiments.export --config=configs/digits.py \
      --workdir=workdir/digits --out=/tmp/digits_model [--overwrite] \
      [--stablehlo [--platforms=cpu,cuda,tpu]]

The artifact holds the run's latest checkpoint's variables, its config and
the 39 budgets of its results.json; load it with
`l2w_jax.serving.Predictor.load(out)` (no TensorFlow needed). With
--stablehlo it also holds the model as StableHLO programs
(`l2w_jax.serving.stablehlo`).
"""

import json

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The evaluated run to export '
                               '(its latest checkpoint and results.json).')
_OUT = flags.DEFINE_string('out', None, 'The artifact directory to write.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing '
                               'artifact at --out.')
_STABLEHLO = flags.DEFINE_bool('stablehlo', False, 'Also write the model as '
                                'StableHLO programs (jax.export), for '
                                'serving outside this package.')
_PLATFORMS = flags.DEFINE_list('platforms', ['cpu', 'cuda', 'tpu'],
                               'Platforms the --stablehlo programs are '
                               'lowered for.')
flags.mark_flags_as_required(['config', 'workdir', 'out'])


def read_results(workdir: str) -> dict:
  """The run's results.json (`workdir` local or gs://); FileNotFoundError
  saying how to make it."""
  from l2w_jax import paths  # pylint: disable=g-import-not-at-top
  from l2w_jax.evaluation.report import RESULTS_FILE  # pylint: disable=g-import-not-at-top
  path = paths.join(workdir, RESULTS_FILE)
  if not paths.is_file(path):
    raise FileNotFoundError(
        f'no {RESULTS_FILE} in {workdir}: evaluate first: python -m '
        f'experiments.evaluate --config=<config> --workdir={workdir}')
  return json.loads(paths.read_text(path))


def main(argv):
  cli.start_quietly(argv)
  from l2w_jax import serving  # pylint: disable=g-import-not-at-top
  from l2w_jax.serving import artifact  # pylint: disable=g-import-not-at-top
  from l2w_jax.training.workdir import restore_variables  # pylint: disable=g-import-not-at-top
  config = common.config_from_flag(_CONFIG)
  # Refused before the slow restore, and checked again when writing.
  artifact.check_replaceable(_OUT.value, _OVERWRITE.value)
  results = read_results(_WORKDIR.value)
  variables, _ = restore_variables(config, _WORKDIR.value)
  path = serving.write_artifact(_OUT.value, config, variables, results,
                                overwrite=_OVERWRITE.value,
                                programs=_STABLEHLO.value,
                                platforms=_PLATFORMS.value)
  size = artifact.artifact_size(path) / 1e6
  print(f'artifact in {path} ({size:.2f} MB); predict with: from '
        f'l2w_jax.serving import Predictor; p = Predictor.load({path!r}); '
        'p(p.normalize(uint8_images), budget=20)', flush=True)


def run():
  cli.run_with_one_line_errors(main, (FileNotFoundError, FileExistsError,
                                      ValueError, RuntimeError))


if __name__ == '__main__':
  run()
