r"""Evaluates a trained run or a converted PyTorch checkpoint.

  # anytime + 39-budget results of a run (results.json, budgeted.png):
  python -m experiments.evaluate --config=configs/digits.py --workdir=workdir/digits
  # a released L2W-DEN ImageNet checkpoint (needs torch to read .pth.tar):
  python -m experiments.evaluate --config=configs/imagenet.py \
      --torch_checkpoint=msdnet_step4.pth.tar --out=/tmp/l2w_in_step4
  # real early exiting: measured time per image against the full network
  python -m experiments.evaluate --config=configs/digits.py \
      --workdir=workdir/digits --mode=cascade
"""

import json

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run to evaluate (its latest '
                               'checkpoint).')
_TORCH = flags.DEFINE_string('torch_checkpoint', None, 'Evaluate this '
                             'PyTorch checkpoint (.pth/.pth.tar/.npz) '
                             'instead of a run.')
_OUT = flags.DEFINE_string('out', None, 'Where results go (default: workdir).')
_MODE = flags.DEFINE_enum('mode', 'budgeted', ['budgeted', 'cascade'],
                          'budgeted: anytime + 39 budgets; cascade: real '
                          'early exiting, timed.')
_BUDGETS = flags.DEFINE_list('budgets', ['5', '10', '15', '20', '25', '30',
                                         '39'], 'Budget indices (1..39) '
                             'for --mode=cascade.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Cascade batch size.')
_LATENCY_IMAGES = flags.DEFINE_integer('latency_images', 100, 'Images timed '
                                       'one at a time.')
flags.mark_flag_as_required('config')


def _variables(config, model, info):
  """Variables of the run in --workdir or of --torch_checkpoint, and the
  iteration of the run (None for a PyTorch checkpoint)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from l2w_jax.convert import torch_state  # pylint: disable=g-import-not-at-top
  from l2w_jax.training.workdir import restore_variables  # pylint: disable=g-import-not-at-top
  if _TORCH.value:
    template = torch_state.variables_template(
        model, jnp.zeros((1,) + info.image_shape))
    state = torch_state.load_torch_checkpoint(_TORCH.value)
    try:
      return torch_state.torch_to_flax(state['model'], template), None
    except torch_state.ConversionError as e:
      raise torch_state.ConversionError(f'{_TORCH.value}: {e}') from e
  if not _WORKDIR.value:
    raise app.UsageError('give --workdir or --torch_checkpoint')
  return restore_variables(config, _WORKDIR.value)


def main(argv):
  cli.start_quietly(argv)
  from l2w_jax import data  # pylint: disable=g-import-not-at-top
  from l2w_jax import paths  # pylint: disable=g-import-not-at-top
  from l2w_jax.evaluation import cascade_report, report  # pylint: disable=g-import-not-at-top
  from l2w_jax.training.learner import method_model  # pylint: disable=g-import-not-at-top
  config = common.config_from_flag(_CONFIG)
  out = _OUT.value or _WORKDIR.value
  if not out:
    raise app.UsageError('give --out when evaluating a PyTorch checkpoint')
  paths.check_writable(out, 'cannot write the results to')  # before any work
  info = data.data_info(config)
  model = method_model(config)
  variables, iteration = _variables(config, model, info)
  if _MODE.value == 'budgeted':
    results = report.evaluate_model(config, model, variables, info)
    if iteration is not None:
      results['iterations'] = iteration
    report.write_results(results, out, config.method.upper(),
                         f'{info.name}: budgeted batch classification')
    return
  rows = cascade_report.measure(
      config, model, variables, info,
      budgets=[int(b) for b in _BUDGETS.value], batch_size=_BATCH.value,
      latency_images=_LATENCY_IMAGES.value)
  print(cascade_report.format_table(rows), flush=True)
  paths.makedirs(out)
  path = paths.join(out, 'cascade.json')
  paths.write_atomic(path, json.dumps(rows, indent=1))
  print(f'cascade timings in {path}', flush=True)


def run():
  cli.run_with_one_line_errors(main)


if __name__ == '__main__':
  run()
