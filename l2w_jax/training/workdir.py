"""The workdir: checked and opened before a run builds anything, and read
back for a run's network (`train.init_from`, evaluation, export)."""

from __future__ import annotations

import jax

from l2w_jax import data
from l2w_jax import paths
from l2w_jax.training.checkpoint import Checkpointer, newest_size
from l2w_jax.training.learner import build_learner, init_train_state
from l2w_jax.training.state import TrainState


class WorkdirError(RuntimeError):
  """The workdir cannot be created or written, or is on a filesystem this
  code cannot write."""


def check_workdir(workdir: str) -> None:
  """Raises WorkdirError (one line: the path, the scheme, what to do) for a
  workdir on a filesystem this code cannot write (`s3://`, `foo://`, or
  `gs://` without GCS support); cheap, so `train_and_evaluate` runs it
  before building anything."""
  try:
    paths.check_writable(workdir, 'cannot use the workdir')
  except paths.UnsupportedPath as e:
    raise WorkdirError(str(e)) from None


def open_workdir(workdir: str, keep: int) -> Checkpointer:
  """The Checkpointer of `workdir` (a local path or a gs:// URL), created if
  needed; WorkdirError naming the path if it cannot be written."""
  check_workdir(workdir)
  try:
    paths.makedirs(workdir)
    probe = paths.join(workdir, f'.write_test_{jax.process_index()}')
    paths.write_bytes(probe, b'ok')
    paths.as_path(probe).unlink()
    checkpointer = Checkpointer(paths.join(workdir, 'checkpoints'),
                                keep=keep)
  except OSError as e:
    raise WorkdirError(
        f'cannot write to the workdir {paths.absolute(workdir)} '
        f'({type(e).__name__}: {e.strerror or e}): give a writable '
        '--workdir (nothing in it was changed)') from e
  return checkpointer


def no_space_message(error: BaseException, workdir: str) -> str | None:
  """The one line of a run in `workdir` stopped by a write that failed for
  lack of room (None if `error` is not one): what was being written, why,
  and how much to free (a checkpoint, which the run writes next)."""
  why = paths.out_of_space(error)
  if why is None:
    return None
  what = (getattr(error, 'path', None) or getattr(error, 'filename', None)
          or f'a file in {workdir}')
  need = max(newest_size(paths.join(workdir, 'checkpoints')) or 0,
             getattr(error, 'needed', 0))
  room = (f'free at least {paths.megabytes(need)} (one checkpoint) in '
          f'{workdir}' if need else f'free space in {workdir}')
  return (f'cannot write {what} ({why}); the checkpoints already saved are '
          f'intact: {room}, then rerun the same command to resume')


def network_from(workdir: str, state: TrainState) -> TrainState:
  """`state` with the parameters and batch statistics of the latest
  checkpoint of the run in `workdir` (`train.init_from`); optimizer states,
  weight net and iteration stay as in `state`."""
  source = Checkpointer(paths.join(workdir, 'checkpoints'))
  try:
    if source.latest_step() is None:
      raise FileNotFoundError(
          f'train.init_from: no checkpoint in {source.directory}; train the '
          'earlier phase there first (train.start_phase=0), or point '
          'train.init_from at a workdir that has one')
    restored, _ = source.restore(state)
  finally:
    source.close()
  return state.replace(params=restored.params,
                       batch_stats=restored.batch_stats)


def restore_variables(config, workdir: str) -> tuple[dict, int]:
  """({'params', 'batch_stats'}, iteration) of the latest checkpoint of a run."""
  info = data.data_info(config)
  learner = build_learner(config)
  checkpointer = Checkpointer(paths.join(workdir, 'checkpoints'))
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}: '
                              'train first (experiments.main) or pass a '
                              'PyTorch checkpoint')
    template = init_train_state(learner, jax.random.PRNGKey(0),
                                info.image_shape)
    state, _ = checkpointer.restore(template)
  finally:
    checkpointer.close()
  return ({'params': state.params, 'batch_stats': state.batch_stats},
          int(state.step))
