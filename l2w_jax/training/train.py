"""The training program: `train_and_evaluate(config, workdir)`.

Trains the configured method (`training.registry`) on the
configured dataset, checkpoints and resumes from `workdir`, writes metrics,
and ends with the anytime and budgeted evaluations in `workdir/results.json`
and `workdir/budgeted.png`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time

import jax
import ml_collections
import numpy as np

from l2w_jax import accelerators
from l2w_jax import compilation
from l2w_jax import data
from l2w_jax import parallel
from l2w_jax import peer_loss
from l2w_jax import paths
from l2w_jax.evaluation import report
from l2w_jax.training import metrics as metrics_lib
from l2w_jax.training import registry
from l2w_jax.training import resume
from l2w_jax.training import schedules
from l2w_jax.training import skipped_records
from l2w_jax.training import step as step_lib
from l2w_jax.training.checkpoint import CheckpointError, Checkpointer
from l2w_jax.training.config_checks import reduction_of, validate_config
from l2w_jax.training.divergence import check_finite, check_state_finite
from l2w_jax.training.final_evaluation import final_evaluation, write_eval
from l2w_jax.training.learner import build_learner, init_train_state
from l2w_jax.training.preemption import Preemption
from l2w_jax.training.workdir import check_workdir, network_from, open_workdir

RESULTS_FILE = report.RESULTS_FILE
PLOT_FILE = report.PLOT_FILE


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
  moments = [h['weight_moments'] for h in halves if 'weight_moments' in h]
  if moments:
    # Over every training sample of the window: the weights' spread per
    # exit and how they follow the per-sample loss.
    stats = metrics_lib.weight_statistics(np.mean(moments, axis=0))
    for k in range(num_exits):
      out[f'train/weight_std_exit{k + 1}'] = stats['std'][k]
      if stats['loss_corr'][k] is not None:
        out[f'train/weight_loss_corr_exit{k + 1}'] = stats['loss_corr'][k]
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
  hint = peer_loss.resume_hint(
      config.distributed.num_processes
      if config.distributed.get('coordinator_address') else None,
      paths.join(paths.absolute(workdir), 'checkpoints'))
  try:
    return _start(config, workdir, interrupt_at_step, overwrite, hint)
  except jax.errors.JaxRuntimeError as e:
    # A peer gone mid-collective (the coordination service's own report of
    # it is turned into the same line by the stderr relay).
    if jax.distributed.is_initialized() and peer_loss.is_peer_loss(e):
      raise peer_loss.PeerLost(peer_loss.message(
          peer_loss.who_was_lost(str(e)), hint)) from e
    raise


def _start(config, workdir, interrupt_at_step, overwrite, hint) -> dict:
  """`train_and_evaluate` once it knows what to say if a peer is lost."""
  allow_cpu = bool(config.distributed.get('allow_cpu', False))
  accelerators.check_before_start(allow_cpu)
  validate_config(config)  # before the processes wait for each other
  parallel.initialize_distributed(config, hint)
  accelerators.check_after_start(allow_cpu)
  check_workdir(workdir)  # an unwritable scheme stops before anything is built
  # Fails here, before compiling anything; a dataset prepared on first use
  # is written by process 0 before the others look (a shared data_dir).
  info = parallel.process_0_first(lambda: data.data_info(config))
  mesh = parallel.make_mesh(config.distributed.num_devices)
  parallel.connect_processes(mesh)  # while the processes are in step
  layout = parallel.batch_layout(config, mesh)
  config = _with_batch_sizes(config, layout)
  steps_per_epoch = data.steps_per_epoch(info, layout.global_batch,
                                         config.train.last_batch)
  if steps_per_epoch < 1:
    raise ValueError(f'train.batch_size {layout.global_batch} exceeds the '
                     f'{info.num_train} training images')
  total = schedules.total_iterations(config.train, steps_per_epoch)
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
  checkpointer = open_workdir(workdir, config.train.keep_checkpoints)
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
  steps_per_epoch = data.steps_per_epoch(info, batch_size,
                                         config.train.last_batch)
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
      state = network_from(config.train.init_from, state)
      log(f'phase {plan[0].name!r} starts from the network of '
          f'{config.train.init_from}')
    writer.write_hparams(config.to_dict())
  step = int(state.step)
  log(f'{config.method} on {info.name}: {info.num_train} training images, '
      f'{steps_per_epoch} iterations/epoch '
      f'({_last_batch_words(config, info, layout)}), {total} iterations, '
      f'{num_exits} exits; thresholds on {_threshold_words(config, info)}; '
      f'{layout.describe()}')
  if info.skipped:
    more = ' and more (results.json lists them)' if len(info.skipped) > 3 \
        else ''
    plural = 's' if len(info.skipped) > 1 else ''
    log(f'dataset.skip_corrupt: left out {len(info.skipped)} unreadable '
        f'record{plural}: {"; ".join(info.skipped[:3])}{more}')

  spec = data.input_spec(config)
  iteration = step_lib.make_iteration(config.method, learner, mesh,
                                      config.train.bn_stats,
                                      input_norm=(spec.mean, spec.std),
                                      reduction=reduction_of(config))
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
    check_state_finite(state, step, checkpointer)
    checkpointer.save(step, state, {
        'step': step, 'epoch': step // steps_per_epoch,
        'batch_in_epoch': step % steps_per_epoch,
        'config': config.to_json()})
    if wait:
      checkpointer.wait_until_finished()

  window, window_start = [], time.perf_counter()
  # One pipeline for the whole run; two batches in flight to the devices.
  # Records a streaming dataset left out before are left out from the start.
  skip_ids, _ = skipped_records.load(workdir)
  recorder = skipped_records.Recorder(workdir, jax.process_index())
  stream = data.train_stream(config, start_step=step,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             num_devices=layout.num_devices,
                             skip_ids=skip_ids, on_skip=recorder)
  try:
    if step < total:
      for batch in parallel.prefetch_to_mesh(stream, mesh):
        scheduled = schedules.iteration_schedule(config, plan, step,
                                                 steps_per_epoch)
        phase, lr, meta_lr = scheduled.phase, scheduled.lr, scheduled.meta_lr
        if scheduled.starts_phase:
          # A new phase trains other parameters with a fresh optimizer, as
          # the original's separate jobs do.
          state = state.replace(opt_state=fresh_opt_state(state.params))
          log(f'phase {phase.index + 1}/{len(plan)} ({phase.name}) from '
              f'iteration {step}')
        state, halves = iteration(state, batch['image'], batch['label'], lr,
                                  meta_lr, scheduled.with_meta,
                                  phase=phase.name)
        step += 1
        if not startup:
          startup.update(_startup(state, compile_log, log))
        stop = preemption.should_stop(step)
        window.append({'halves': halves, 'lr': lr, 'meta_lr': meta_lr,
                       'phase': phase.index})
        last_of_epoch = step % steps_per_epoch == 0 or step == total
        if step % config.train.log_every_steps == 0 or last_of_epoch or stop:
          fetched = jax.device_get(window)
          check_finite(fetched, step - len(window) + 1, checkpointer)
          scalars = _summarise(fetched, num_exits)
          elapsed = time.perf_counter() - window_start
          scalars['train/images_per_second'] = (len(window) * batch_size /
                                                max(elapsed, 1e-9))
          scalars['epoch'] = step / steps_per_epoch
          if config.dataset.get('skip_corrupt', False):
            # Records left out as unreadable, so far (in memory: at load).
            scalars['data/skipped_records'] = (len(info.skipped) +
                                               len(recorder.entries))
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
          write_eval(writer, step, statistics, state, config, info)
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
    _, streamed = skipped_records.load(workdir)
    info = dataclasses.replace(info, skipped=info.skipped + streamed)
    results = final_evaluation(config, workdir, learner, state, info,
                               statistics, layout, plan, startup)
    writer.write_scalars(step, {
        f'test/top1_exit{k + 1}': v
        for k, v in enumerate(results['anytime']['top1'])})
    return results
  finally:
    stream.close()
    preemption.uninstall()


def _last_batch_words(config, info, layout: parallel.BatchLayout) -> str:
  """How an epoch ends, for the start line."""
  batch = layout.global_batch
  left = info.num_train % batch
  if not left:
    return 'every batch full'
  if config.train.last_batch == 'drop':
    return f'{left} images an epoch left out: train.last_batch=drop'
  last = data.last_batch_size(info.num_train, batch, 'keep',
                              layout.num_devices)
  padded = f', {last - left} repeated' if last > left else ''
  return f'the last of {last} images{padded}'


def _threshold_words(config, info) -> str:
  """Where thresholds come from, for the start line."""
  augmented = ('augmented' if config.eval.get('threshold_augment', True)
               else 'not augmented')
  if config.eval.protocol == 'holdout':
    return f'{info.num_holdout} held-out images, {augmented}'
  if info.num_thresholds == info.num_train:
    return f'every training image ({info.num_train}), {augmented}'
  return f'{info.num_thresholds} random training images, {augmented}'


def _startup(state, compile_log: compilation.CompileLog, log) -> dict:
  """Once the first iteration of this process is done: how long the start
  took and what compiling cost (logged; stored in results.json)."""
  jax.block_until_ready(state)
  seconds = metrics_lib.process_seconds()
  log(f'first iteration done {seconds:.1f} s after the process started; '
      f'compiled {compile_log.describe()}')
  return {'startup_s': round(seconds, 3),
          'compilation': compile_log.summary()}
