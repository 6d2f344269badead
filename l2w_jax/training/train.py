"""The training program: `train_and_evaluate(config, workdir)`.

Trains the configured method (`training.registry`) on the
configured dataset, checkpoints and resumes from `workdir`, writes metrics,
and ends with the anytime and budgeted evaluations in `workdir/results.json`
and `workdir/budgeted.png`.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from l2w_jax import accelerators
from l2w_jax import compilation
from l2w_jax import data
from l2w_jax import parallel
from l2w_jax import paths
from l2w_jax.evaluation import report
from l2w_jax.training import metrics as metrics_lib
from l2w_jax.training import registry
from l2w_jax.training import resume
from l2w_jax.training import schedules
from l2w_jax.training import step as step_lib
from l2w_jax.training.checkpoint import CheckpointError, Checkpointer
from l2w_jax.training.learner import build_learner, init_train_state
from l2w_jax.training.schedules import cosine_learning_rate
from l2w_jax.training.state import TrainState

THRESHOLD_SOURCES = ('holdout', 'train')
RESULTS_FILE = report.RESULTS_FILE
PLOT_FILE = report.PLOT_FILE


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or infinite."""


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(
      np.isfinite(v))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


# (field, allowed range in words, test): every number a run reads, checked
# before anything compiles. NaN fails every test (comparisons are False).
_NUMERIC_FIELDS = (
    ('seed', 'an integer', _is_int),
    ('meta.epsilon', '>= 0', lambda v: _finite(v) and v >= 0),
    ('meta.lr', 'finite and > 0', lambda v: _finite(v) and v > 0),
    ('meta.weight_decay', 'finite and >= 0', lambda v: _finite(v) and v >= 0),
    ('meta.hidden_size', 'an integer >= 1', lambda v: _is_int(v) and v >= 1),
    ('meta.num_layers', 'an integer >= 1', lambda v: _is_int(v) and v >= 1),
    ('meta.interval', 'an integer >= 1', lambda v: _is_int(v) and v >= 1),
    ('meta.target_p_index', 'an integer in [1, 39]',
     lambda v: _is_int(v) and 1 <= v <= 39),
    ('train.lr', 'finite and > 0', lambda v: _finite(v) and v > 0),
    ('train.momentum', 'in [0, 1)', lambda v: _finite(v) and 0 <= v < 1),
    ('train.weight_decay', 'finite and >= 0', lambda v: _finite(v) and v >= 0),
    ('train.label_smoothing', 'in [0, 1)',
     lambda v: _finite(v) and 0 <= v < 1),
    ('train.lr_gamma', 'finite and > 0', lambda v: _finite(v) and v > 0),
    ('train.batch_size', 'an integer > 0 (or set per_device_batch_size)',
     lambda v: _is_int(v) and v > 0),
    ('train.per_device_batch_size', 'an integer >= 0 (0: from batch_size)',
     lambda v: _is_int(v) and v >= 0),
    ('train.epochs', 'an integer >= 0', lambda v: _is_int(v) and v >= 0),
    ('train.num_steps', 'an integer (> 0 overrides epochs)', _is_int),
    ('train.keep_checkpoints', 'an integer >= 1',
     lambda v: _is_int(v) and v >= 1),
    ('train.log_every_steps', 'an integer >= 1',
     lambda v: _is_int(v) and v >= 1),
    ('train.checkpoint_every_steps', 'an integer >= 1',
     lambda v: _is_int(v) and v >= 1),
    ('train.eval_every_epochs', 'an integer >= 0 (0: only the final one)',
     lambda v: _is_int(v) and v >= 0),
    ('train.phase_split', 'in (0, 1)', lambda v: _finite(v) and 0 < v < 1),
    ('dataset.holdout', 'an integer >= 0', lambda v: _is_int(v) and v >= 0),
    ('eval.batch_size', 'an integer > 0', lambda v: _is_int(v) and v > 0),
)


def _field(config, path: str):
  node = config
  for key in path.split('.'):
    if key not in node:
      return None
    node = node[key]
  return node


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError (one line: the field, its value, the allowed range)
  for a config that cannot run, before anything is built or compiled."""
  registry.get(config.method)  # raises naming the available methods
  per_device = _field(config, 'train.per_device_batch_size')
  for path, allowed, ok in _NUMERIC_FIELDS:
    value = _field(config, path)
    if (path == 'train.batch_size' and _is_int(per_device) and
        per_device > 0):
      continue  # the global batch comes from the per-device one
    if value is not None and not ok(value):
      raise ValueError(f'{path}: must be {allowed}, got {value!r}')
  source = config.eval.threshold_source
  if source not in THRESHOLD_SOURCES:
    raise ValueError(f'eval.threshold_source: unknown source {source!r}; use '
                     f'one of {THRESHOLD_SOURCES}')
  if config.train.num_steps <= 0 and config.train.epochs <= 0:
    raise ValueError('train.epochs or train.num_steps must be positive')
  reduction = _reduction(config)
  if reduction not in parallel.REDUCTIONS:
    raise ValueError(f'distributed.reduction: unknown reduction '
                     f'{reduction!r}; use one of {parallel.REDUCTIONS}')
  if reduction == 'ordered' and config.train.sync_bn:
    raise ValueError('distributed.reduction=ordered does not cover '
                     'train.sync_bn (its statistics are all-reduced): set '
                     'one of them back to its default')
  schedules.check_schedule(config.train)


def _reduction(config) -> str:
  return config.distributed.get('reduction', 'all_reduce')


class Preemption:
  """Set by SIGTERM or Ctrl-C (SIGINT) (or, for tests, at a given step):
  save and stop.

  With several processes the decision must be collective (a process that
  stopped alone would leave the others waiting in the next all-reduce): JAX's
  preemption service catches SIGTERM on any host, and every process stops
  after the same iteration (`reached_preemption_sync_point`). Its own SIGTERM
  handler must stay in place, so no Python handler is installed then.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, at_step: int | None = None):
    self.requested = False
    self._at_step = at_step
    self._previous = {}
    self._collective = jax.process_count() > 1

  def install(self) -> None:
    if self._collective:
      return
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      # A second Ctrl-C does not wait for the iteration to finish.
      raise KeyboardInterrupt
    print(f'{signal.Signals(signum).name}: saving a checkpoint after this '
          'iteration and stopping', flush=True)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after iteration `step`; call it once per
    iteration, on every process."""
    if self._collective and multihost_utils.reached_preemption_sync_point(
        step):
      print(f'SIGTERM on some process: every process saves iteration {step} '
            'and stops', flush=True)
      self.requested = True
    return self.requested or (self._at_step is not None and
                              step >= self._at_step)


def _summarise(fetched: list, num_exits: int) -> dict[str, float]:
  """Averages a window of per-iteration metrics (fetched from device)."""
  out = {}
  halves = [h for iteration in fetched for h in iteration['halves']]
  out['train/loss'] = float(np.mean([h['train_loss'] for h in halves]))
  images = sum(int(h['num_images']) for h in halves)
  correct = np.sum([h['correct'] for h in halves], axis=0)
  for k in range(num_exits):
    out[f'train/loss_exit{k + 1}'] = float(np.mean(
        [h['loss_per_exit'][k] for h in halves]))
    out[f'train/acc_exit{k + 1}'] = 100.0 * float(correct[k]) / images
    out[f'train/weight_exit{k + 1}'] = float(np.mean(
        [h['weight_per_exit'][k] for h in halves]))
  out['train/acc_last'] = out[f'train/acc_exit{num_exits}']
  meta = [h['meta_loss'] for h in halves if 'meta_loss' in h]
  if meta:
    out['train/meta_loss'] = float(np.mean(meta))
  out['train/lr'] = fetched[-1]['lr']
  out['train/meta_lr'] = fetched[-1]['meta_lr']
  out['train/phase'] = fetched[-1]['phase']
  return out


def _with_batch_sizes(config: ml_collections.ConfigDict,
                      layout: parallel.BatchLayout):
  """A copy of `config` whose `train.batch_size` is the global batch and
  whose `eval.batch_size` is a multiple of the device count (evaluation pads
  and masks its last batch anyway)."""
  config = config.copy_and_resolve_references()
  devices = layout.num_devices
  with config.unlocked():
    config.train.batch_size = layout.global_batch
    config.eval.batch_size = -(-config.eval.batch_size // devices) * devices
  return config


def _diverged(what: str, step: int, checkpointer: Checkpointer):
  """The TrainingDiverged error for `what` going non-finite at iteration
  `step`, saying truthfully what is on disk and what a rerun does."""
  last = checkpointer.latest_step()
  if last is None:
    disk = ('no checkpoint has been written, so rerunning the same command '
            'starts from scratch and meets the same divergence')
  else:
    disk = (f'nothing non-finite was saved: the newest checkpoint (iteration '
            f'{last}) is untouched, and rerunning the same command resumes '
            'from it and meets the same divergence')
  return TrainingDiverged(
      f'{what} at iteration {step}: training stopped; {disk}. Lower train.lr '
      'or meta.lr (or check the input data), then run in a new --workdir or '
      'with --overwrite (which moves this run aside).')


def _first_non_finite(fetched: list, first_step: int):
  """(iteration, quantity, value) of the first non-finite loss, meta loss or
  exit weight in a window of fetched per-iteration metrics whose first
  iteration is `first_step` (1-based, as logged); None if all are finite."""
  for offset, iteration in enumerate(fetched):
    for half in iteration['halves']:
      # The most specific first: an exit's loss makes the total non-finite.
      quantities = [(f"exit {k + 1}'s loss", v)
                    for k, v in enumerate(np.ravel(half['loss_per_exit']))]
      if 'meta_loss' in half:
        quantities.append(('the meta loss', half['meta_loss']))
      quantities += [(f"exit {k + 1}'s mean weight", v)
                     for k, v in enumerate(np.ravel(half['weight_per_exit']))]
      quantities.append(('the training loss', half['train_loss']))
      for name, value in quantities:
        if not np.isfinite(value):
          return first_step + offset, name, float(value)
  return None


def _check_finite(fetched: list, first_step: int,
                  checkpointer: Checkpointer) -> None:
  """Raises TrainingDiverged naming the first non-finite quantity."""
  bad = _first_non_finite(fetched, first_step)
  if bad is not None:
    step, name, value = bad
    raise _diverged(f'{name} became {value}', step, checkpointer)


def _is_float(leaf) -> bool:
  """Whether `leaf` can hold a NaN or Inf (integers and keys cannot)."""
  dtype = leaf.dtype if hasattr(leaf, 'dtype') else np.result_type(leaf)
  return jnp.issubdtype(dtype, jnp.inexact)


def _non_finite_leaf(tree) -> str | None:
  """The path of the first leaf of `tree` holding a NaN or Inf, or None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _is_float(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
      return jax.tree_util.keystr(path)
  return None


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  """One boolean on the device: whether every float leaf is finite (the
  state is reduced where it lives; only this scalar is fetched)."""
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def _check_state_finite(state: TrainState, step: int,
                        checkpointer: Checkpointer) -> None:
  """Raises TrainingDiverged instead of letting a NaN/Inf state be saved.

  Checks on the device and fetches one scalar; only a non-finite state is
  copied to the host, to name its first bad leaf."""
  leaves = [x for x in jax.tree_util.tree_leaves(state) if _is_float(x)]
  if bool(_all_finite(leaves)):
    return
  leaf = _non_finite_leaf(jax.device_get(state))
  raise _diverged(f'the training state became non-finite (first: {leaf})',
                  step, checkpointer)


def _network_from(workdir: str, state: TrainState) -> TrainState:
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


def _open_workdir(workdir: str, keep: int) -> Checkpointer:
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


def finished_or_trained(config: ml_collections.ConfigDict,
                        workdir: str) -> tuple[dict, float | None]:
  """(results, seconds) of the run of `config` in `workdir`: its
  results.json when it exists (seconds None: nothing was trained), else
  `train_and_evaluate(config, workdir)` (which resumes an interrupted run)
  and the seconds it took. Lets a script that runs several experiments be
  rerun to redraw without retraining."""
  path = paths.join(workdir, RESULTS_FILE)
  if paths.exists(path):
    return json.loads(paths.read_text(path)), None
  start = time.perf_counter()
  results = train_and_evaluate(config, workdir)
  return results, time.perf_counter() - start


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       interrupt_at_step: int | None = None,
                       overwrite: bool = False) -> dict:
  """Trains, checkpoints, resumes and evaluates; returns the results dict.

  Rerun with the same `workdir` it resumes from the newest readable
  checkpoint (moving unreadable ones aside, `resume`), provided the config
  matches the checkpoint's (`resume.RESUMABLE_FIELDS` may change);
  `overwrite` moves an existing run in `workdir` aside and starts afresh.
  `interrupt_at_step` behaves like a SIGTERM arriving once that many
  iterations are done (save, stop, return {'interrupted_at': step}); tests
  use it to check that resuming continues the same run.
  """
  allow_cpu = bool(config.distributed.get('allow_cpu', False))
  accelerators.check_before_start(allow_cpu)
  parallel.initialize_distributed(config)
  accelerators.check_after_start(allow_cpu)
  validate_config(config)
  check_workdir(workdir)  # an unwritable scheme stops before anything is built
  info = data.data_info(config)  # fails here, before compiling anything
  if config.eval.threshold_source == 'holdout' and info.num_holdout == 0:
    raise ValueError(
        'eval.threshold_source=holdout but the dataset has no held-out part: '
        'set dataset.holdout > 0, or eval.threshold_source=train to search '
        'thresholds on the training set as the original L2W-DEN scripts do')
  mesh = parallel.make_mesh(config.distributed.num_devices)
  layout = parallel.batch_layout(config, mesh)
  config = _with_batch_sizes(config, layout)
  steps_per_epoch = data.steps_per_epoch(info, layout.global_batch)
  if steps_per_epoch < 1:
    raise ValueError(f'train.batch_size {layout.global_batch} exceeds the '
                     f'{info.num_train} training images')
  total = (config.train.num_steps if config.train.num_steps > 0 else
           config.train.epochs * steps_per_epoch)
  plan = registry.phase_plan(config, total)
  learner = build_learner(config)  # a model that cannot be built stops here
  is_main = jax.process_index() == 0
  log = functools.partial(print, flush=True) if is_main else (
      lambda *args, **kwargs: None)
  log(accelerators.describe_devices())
  log(f'compilation cache: {compilation.active_directory() or "off"}')
  if overwrite:
    moved = resume.move_run_aside(workdir)
    if moved:
      log(f'--overwrite: moved the run in {workdir} to {moved}; starting '
          'afresh')
  checkpointer = _open_workdir(workdir, config.train.keep_checkpoints)
  try:
    # Before anything is compiled or written: a refused run leaves the
    # workdir as it was.
    resume.check_resumable(checkpointer, config, workdir, log)
    writer = metrics_lib.create_writer(workdir, write_to_disk=is_main)
    try:
      with compilation.CompileLog() as compile_log:
        return _train(config, workdir, info, mesh, layout, learner, plan,
                      writer, checkpointer, log, interrupt_at_step,
                      compile_log)
    finally:
      writer.flush()
  except BaseException:
    _close_after_error(checkpointer)
    raise
  finally:
    checkpointer.close()  # waits for a save in flight; raises if it failed


def _close_after_error(checkpointer: Checkpointer) -> None:
  """Closes `checkpointer` while the run's own error propagates: a save in
  flight is waited for (so that it lands); if it failed as well, that is
  said on one line of stderr, and the run's error stays the one raised."""
  try:
    checkpointer.close()
  except CheckpointError as e:
    print(f'also: {e}', file=sys.stderr, flush=True)


def _train(config, workdir, info, mesh, layout, learner, plan, writer,
           checkpointer, log, interrupt_at_step,
           compile_log: compilation.CompileLog) -> dict:
  """The body of `train_and_evaluate` once the workdir is open: the run of
  `plan` (its phases, `plan[-1]` ending at the last iteration)."""
  num_exits = learner.model.num_exits
  batch_size = layout.global_batch
  steps_per_epoch = data.steps_per_epoch(info, batch_size)
  total = plan[-1].start + plan[-1].length
  startup = {}

  state = jax.device_put(
      init_train_state(learner, jax.random.PRNGKey(config.seed),
                       info.image_shape), parallel.replicated(mesh))
  restored, meta = resume.restore_newest(checkpointer, state, config, workdir,
                                         log)
  if restored is not None:
    state = restored
    log(f'resumed from {checkpointer.directory} at iteration '
        f'{int(state.step)} (epoch {meta.get("epoch")})')
  else:
    if config.train.get('init_from'):
      state = _network_from(config.train.init_from, state)
      log(f'phase {plan[0].name!r} starts from the network of '
          f'{config.train.init_from}')
    writer.write_hparams(config.to_dict())
  step = int(state.step)
  log(f'{config.method} on {info.name}: {info.num_train} training images, '
      f'{steps_per_epoch} iterations/epoch, {total} iterations, {num_exits} '
      f'exits; {layout.describe()}')

  spec = data.input_spec(config)
  iteration = step_lib.make_iteration(config.method, learner, mesh,
                                      config.train.bn_stats,
                                      input_norm=(spec.mean, spec.std),
                                      reduction=_reduction(config))
  fresh_opt_state = jax.jit(learner.tx.init,
                            out_shardings=parallel.replicated(mesh))
  # Evaluation on the mesh: each process decodes its rows, as uint8.
  statistics = report.jitted_statistics(learner.model, mesh,
                                        input_norm=(spec.mean, spec.std))

  preemption = Preemption(interrupt_at_step)
  preemption.install()
  progress = metrics_lib.Progress(step, total)

  def save(step, wait=False):
    """Checks the state on the device, then starts checkpoint `step`, which
    is written while training goes on; `wait`: returns once it is on disk
    (a failed write raises CheckpointError here or at the next save)."""
    _check_state_finite(state, step, checkpointer)
    checkpointer.save(step, state, {
        'step': step, 'epoch': step // steps_per_epoch,
        'batch_in_epoch': step % steps_per_epoch,
        'config': config.to_json()})
    if wait:
      checkpointer.wait_until_finished()

  window, window_start = [], time.perf_counter()
  # One pipeline for the whole run; two batches in flight to the devices.
  stream = data.train_stream(config, start_step=step,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  try:
    if step < total:
      for batch in parallel.prefetch_to_mesh(stream, mesh):
        in_epoch = step % steps_per_epoch
        phase = registry.phase_at(plan, step)
        if step == phase.start and phase.index > 0:
          # A new phase trains other parameters with a fresh optimizer, as
          # the original's separate jobs do.
          state = state.replace(opt_state=fresh_opt_state(state.params))
          log(f'phase {phase.index + 1}/{len(plan)} ({phase.name}) from '
              f'iteration {step}')
        lr = schedules.learning_rate(config.train, step - phase.start,
                                     phase.length, steps_per_epoch)
        meta_lr = cosine_learning_rate(config.meta.lr, step, total)
        with_meta = in_epoch % config.meta.interval == 0
        state, halves = iteration(state, batch['image'], batch['label'], lr,
                                  meta_lr, with_meta, phase=phase.name)
        step += 1
        if not startup:
          startup.update(_startup(state, compile_log, log))
        stop = preemption.should_stop(step)
        window.append({'halves': halves, 'lr': lr, 'meta_lr': meta_lr,
                       'phase': phase.index})
        last_of_epoch = step % steps_per_epoch == 0 or step == total
        if step % config.train.log_every_steps == 0 or last_of_epoch or stop:
          fetched = jax.device_get(window)
          _check_finite(fetched, step - len(window) + 1, checkpointer)
          scalars = _summarise(fetched, num_exits)
          elapsed = time.perf_counter() - window_start
          scalars['train/images_per_second'] = (len(window) * batch_size /
                                                max(elapsed, 1e-9))
          scalars['epoch'] = step / steps_per_epoch
          writer.write_scalars(step, scalars)
          log(progress.line(step, scalars))
          window, window_start = [], time.perf_counter()
        # A phase's last state is always kept (IMTA's stage-1 network).
        if (step % config.train.checkpoint_every_steps == 0 or
            (step == phase.start + phase.length and step < total)):
          save(step)
        if (last_of_epoch and config.train.eval_every_epochs > 0 and
            (step // steps_per_epoch) % config.train.eval_every_epochs == 0
            and step < total):
          _write_eval(writer, step, statistics, state, config, info)
        if stop:
          save(step, wait=True)  # "saved" is printed once it is on disk
          print(f'interrupted: checkpoint saved at iteration {step}; rerun '
                'the same command to resume', flush=True)
          return {'interrupted_at': step}
        if step >= total:
          break
    # results.json marks a finished run: only once its last checkpoint is
    # on disk (the export reads that checkpoint).
    save(step, wait=True)
    results = final_evaluation(config, workdir, learner, state, info,
                               statistics, layout, plan, startup)
    writer.write_scalars(step, {
        f'test/top1_exit{k + 1}': v
        for k, v in enumerate(results['anytime']['top1'])})
    return results
  finally:
    stream.close()
    preemption.uninstall()


def _startup(state, compile_log: compilation.CompileLog, log) -> dict:
  """Once the first iteration of this process is done: how long the start
  took and what compiling cost (logged; stored in results.json)."""
  jax.block_until_ready(state)
  seconds = metrics_lib.process_seconds()
  log(f'first iteration done {seconds:.1f} s after the process started; '
      f'compiled {compile_log.describe()}')
  return {'startup_s': round(seconds, 3),
          'compilation': compile_log.summary()}


def _write_eval(writer, step, statistics, state, config, info) -> None:
  split = 'holdout' if info.num_holdout else 'test'
  outputs = statistics.outputs(config, {'params': state.params,
                                        'batch_stats': state.batch_stats},
                               split)
  scalars = {}
  for k, (top1, top5, loss) in enumerate(zip(
      outputs.top1_accuracy(), outputs.top5_accuracy(),
      outputs.mean_loss())):
    scalars[f'val/acc_exit{k + 1}'] = float(top1)
    scalars[f'val/top5_exit{k + 1}'] = float(top5)
    scalars[f'val/loss_exit{k + 1}'] = float(loss)
  writer.write_scalars(step, scalars)
  accs = ' '.join(f'{a:.1f}' for a in outputs.top1_accuracy())
  print(f'  {split} top-1 per exit: {accs}', flush=True)


def final_evaluation(config, workdir, learner, state, info, statistics=None,
                     layout: parallel.BatchLayout | None = None,
                     plan: tuple[registry.Phase, ...] = (),
                     startup: dict | None = None) -> dict:
  """Anytime and 39-budget evaluation; writes results.json and the plot
  (process 0 only)."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  results = report.evaluate_model(config, learner.model, variables, info,
                                  statistics)
  results['iterations'] = int(state.step)
  results.update(startup or {})
  if plan:
    results['phases'] = [{'name': p.name, 'start': p.start,
                          'length': p.length} for p in plan]
  if layout is not None:
    results.update(num_devices=layout.num_devices,
                   num_processes=layout.num_processes,
                   per_device_batch=layout.per_device_batch,
                   global_batch=layout.global_batch)
  if jax.process_index() == 0:
    report.write_results(results, workdir, config.method.upper(),
                         f'{info.name}: budgeted batch classification')
  return results


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
