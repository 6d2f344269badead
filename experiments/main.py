r"""Trains and evaluates an early-exit network.

  python -m experiments.main --config=configs/digits.py --workdir=workdir/digits
  python -m experiments.main --config=configs/cifar100.py --workdir=/tmp/c100 \
      --config.meta.epsilon=0.5

Rerunning with the same --workdir resumes from its latest checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import common
from experiments import cli

from l2w_jax.accelerators import PlatformError
from l2w_jax.data import CorruptRecordError
from l2w_jax.data import DatasetNotFoundError
from l2w_jax.peer_loss import EXIT_STATUS, PeerLost
from l2w_jax.training.checkpoint import CheckpointError
from l2w_jax.training.divergence import TrainingDiverged
from l2w_jax.training.train import train_and_evaluate
from l2w_jax.training.workdir import WorkdirError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and '
                               'results go here.')
_OVERWRITE = flags.DEFINE_boolean(
    'overwrite', False, 'Move an existing run in --workdir aside (to '
    '<workdir>.replaced-<time>; nothing is deleted) and start afresh.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  # Library INFO/WARNING logs (orbax, tfds) drown the progress lines; pass
  # --verbosity=0 to see them.
  cli.start_quietly(argv)
  try:
    train_and_evaluate(common.config_from_flag(_CONFIG), _WORKDIR.value,
                       overwrite=_OVERWRITE.value)
  except (CorruptRecordError, DatasetNotFoundError, CheckpointError,
          PlatformError, TrainingDiverged, WorkdirError, ValueError) as e:
    cli.exit_with_message(f'error: {e}', 1)
  except PeerLost as e:
    cli.exit_with_message(str(e), EXIT_STATUS)
  except OSError as e:  # a full disk or quota while writing metrics, results
    cli.exit_with_message(cli.os_error_line(e, _WORKDIR.value), 1)
  except KeyboardInterrupt:
    cli.exit_with_message('interrupted before a checkpoint could be saved; '
                          'rerun the same command to resume from the newest '
                          'checkpoint', 130)


if __name__ == '__main__':
  app.run(main)
