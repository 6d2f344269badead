"""Learning-rate schedules, evaluated on the host in float64 like the
originals, and what each iteration of a run does (`iteration_schedule`)."""

from __future__ import annotations

import dataclasses
import math

from l2w_jax.training import registry


def cosine_learning_rate(base: float, iteration: int, total: int) -> float:
  """lr0 * (1 + cos(pi * t / T)) / 2, t counting iterations from 0.

  L2W-DEN's `adjust_learning_rate` / `adjust_meta_learning_rate` set this
  at the start of every iteration, for the backbone and (with its own lr0)
  the weight net, whatever `--lr-type` says (the flag is parsed, never
  read).
  """
  if total <= 0:
    raise ValueError(f'the schedule needs a positive number of iterations, '
                     f'got {total}')
  return 0.5 * base * (1.0 + math.cos(math.pi * iteration / total))


SCHEDULES = ('cosine', 'multistep')


def multistep_learning_rate(base: float, epoch: int, total_epochs: float,
                            milestones, gamma: float = 0.1) -> float:
  """lr0 * gamma^(number of milestones reached), per epoch.

  Milestones are fractions of the run: MSDNet, IMTA and BoostNet on CIFAR
  divide by 10 at epochs 150 and 225 of 300 (0.5, 0.75; IMTA's
  `epoch >= 0.5 * epochs`), on ImageNet at 30 and 60 of 90 (1/3, 2/3).
  """
  reached = sum(1 for m in milestones if epoch >= m * total_epochs)
  return base * gamma**reached


def check_schedule(train_config) -> None:
  """Raises ValueError naming the field if `train.schedule` cannot run."""
  schedule = train_config.get('schedule', 'cosine')
  if schedule not in SCHEDULES:
    raise ValueError(f'train.schedule: unknown schedule {schedule!r}; use one '
                     f'of {SCHEDULES}')
  if schedule == 'multistep' and any(
      not 0.0 < m <= 1.0 for m in train_config.lr_milestones):
    raise ValueError('train.lr_milestones: fractions of the run in (0, 1], '
                     f'got {train_config.lr_milestones}')


def learning_rate(train_config, step: int, total: int,
                  steps_per_epoch: int) -> float:
  """The backbone's learning rate at iteration `step` of `total` under
  `train.schedule` ('cosine' per iteration, or 'multistep' per epoch)."""
  if train_config.get('schedule', 'cosine') == 'cosine':
    return cosine_learning_rate(train_config.lr, step, total)
  check_schedule(train_config)
  return multistep_learning_rate(
      train_config.lr, step // steps_per_epoch, total / steps_per_epoch,
      train_config.lr_milestones, train_config.lr_gamma)


@dataclasses.dataclass(frozen=True)
class IterationSchedule:
  """What iteration `step` of a run does."""
  phase: registry.Phase
  lr: float  # the backbone's (and the virtual step's) learning rate
  meta_lr: float  # the weight net's
  with_meta: bool  # whether a method with a meta step makes one
  starts_phase: bool  # a later phase begins: fresh backbone optimizer state


def total_iterations(train_config, steps_per_epoch: int) -> int:
  """Iterations of a run: train.num_steps when > 0, else train.epochs
  epochs of `steps_per_epoch` (`data.steps_per_epoch`)."""
  if train_config.num_steps > 0:
    return int(train_config.num_steps)
  return int(train_config.epochs * steps_per_epoch)


def iteration_schedule(config, plan: tuple[registry.Phase, ...], step: int,
                       steps_per_epoch: int) -> IterationSchedule:
  """The schedule of iteration `step` (0-based) of the run `plan`.

  Args:
    config: the experiment config (config.train's schedule, config.meta.lr
      and config.meta.interval).
    plan: the run's phases (`registry.phase_plan`).
    step: the global iteration, counted from the start of training.
    steps_per_epoch: iterations in an epoch.

  Returns:
    `IterationSchedule`: the phase; the backbone's learning rate under
    `train.schedule` over the phase; the weight net's cosine over the whole
    run; a meta step iff the iteration's index within its epoch is a
    multiple of `meta.interval` (L2W-DEN's `i % meta_interval == 0`, `i`
    restarting at 0 every epoch).
  """
  phase = registry.phase_at(plan, step)
  total = plan[-1].start + plan[-1].length
  in_epoch = step % steps_per_epoch
  return IterationSchedule(
      phase=phase,
      lr=learning_rate(config.train, step - phase.start, phase.length,
                       steps_per_epoch),
      meta_lr=cosine_learning_rate(config.meta.lr, step, total),
      with_meta=in_epoch % config.meta.interval == 0,
      starts_phase=step == phase.start and phase.index > 0)
