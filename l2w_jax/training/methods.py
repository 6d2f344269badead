"""Training methods by name (`config.method`): a registry of steps.

A method trained in halves, as L2W-DEN trains (its uniform baseline too), is
one function with the signature of `l2w.l2w_half_step`:

  half_step(learner, state, train_images, train_labels, meta_images,
            meta_labels, learning_rate, meta_learning_rate, with_meta)
      -> (new_state, metrics)

run per device on each half of a batch (train on one half; the other half
is there for methods with a meta step). Its gradients go through
`learner.reduce_grads` and its moved BatchNorm statistics through
`learner.reduce_batch_stats`, which the sharded step sets to cross-device
reductions. Metrics must hold `train_loss` (scalar), `loss_per_exit`,
`weight_per_exit` (K,), `correct` (K,) top-1 hits, and `meta_loss` on meta
iterations; anything else (per-sample arrays) stays on the device.

A method trained on whole batches, as the other methods' originals do, is
`batch_step(learner, state, images, labels, learning_rate) -> (new_state,
metrics)`, run once per iteration on every device's whole shard, with the
same reductions and metrics.

Adding a method is `register('name', half_step, uses_meta_step=...)` or
`register('name', batch_step=..., uses_meta_step=False)`; `backbone` names
what the method changes in the backbone (e.g. gradient equilibrium).

A method may run in phases (the training regimes: backbone, then heads;
IMTA's two stages): `register(..., phases=(PhaseStep('backbone',
batch_step=...), PhaseStep('heads', batch_step=...)))`, each phase a half
step or a whole-batch step compiled on its own; `phase_plan` splits the run
by `train.phase_split`, and the training loop restarts the learning-rate
schedule and the backbone's optimizer state at every phase boundary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from l2w_jax.meta import l2w
from l2w_jax.methods import boosting, imta, regimes
from l2w_jax.models import backbone_config


@dataclasses.dataclass(frozen=True)
class PhaseStep:
  """The step of one phase: a half step or a whole-batch step (exactly one)."""
  name: str
  half_step: Callable | None = None
  batch_step: Callable | None = None

  def __post_init__(self):
    if (self.half_step is None) == (self.batch_step is None):
      raise ValueError(f'phase {self.name!r}: give exactly one of half_step '
                       'and batch_step')


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered training method: its phases' steps (one phase, named
  after the method, for most methods)."""
  name: str
  steps: tuple[PhaseStep, ...]
  uses_meta_step: bool  # whether `meta.interval` iterations do a meta step
  # config -> the backbone config fields the method sets (e.g. gradient
  # equilibrium, BoostNet's reweights); None: the backbone as configured.
  backbone: Callable | None = None
  # backbone (MSDNet or RANet) -> the network the method trains around it; None:
  # the backbone itself.
  network: Callable | None = None
  # config -> {name: value} static hyper-parameters of the method, checked
  # (ValueError naming the field); the step reads `learner.option(name)`.
  options: Callable | None = None
  # (learner, dtype) -> the initial `TrainState.method_state` (checkpointed
  # with the rest of the state); None: the method keeps no state of its own.
  initial_state: Callable | None = None

  @property
  def phases(self) -> tuple[str, ...]:
    return tuple(step.name for step in self.steps)


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase of a run: `length` iterations from iteration `start`. Each
  phase has its own learning-rate schedule, and every phase after the first
  starts with a fresh optimizer state of the backbone."""
  index: int
  name: str
  start: int
  length: int


_METHODS: dict[str, Method] = {}


def register(name: str, half_step: Callable | None = None, *,
             uses_meta_step: bool, batch_step: Callable | None = None,
             backbone: Callable | None = None,
             phases: tuple[PhaseStep, ...] = (),
             network: Callable | None = None,
             options: Callable | None = None,
             initial_state: Callable | None = None) -> None:
  """Makes a method available as `config.method = name`: one step (exactly
  one of `half_step` and `batch_step`) or the `phases`' steps in order."""
  if name in _METHODS:
    raise ValueError(f'method {name!r} is already registered')
  if phases:
    if half_step is not None or batch_step is not None:
      raise ValueError(f'method {name!r}: give phases or one step, not both')
    steps = tuple(phases)
  else:
    steps = (PhaseStep(name, half_step, batch_step),)
  _METHODS[name] = Method(name, steps, uses_meta_step, backbone, network,
                          options, initial_state)


def available() -> tuple[str, ...]:
  return tuple(sorted(_METHODS))


def get(name: str) -> Method:
  """The method called `name`; ValueError listing the available ones."""
  if name not in _METHODS:
    raise ValueError(f'method: unknown training method {name!r}; available: '
                     f'{available()}')
  return _METHODS[name]


def phase_plan(config, total: int) -> tuple[Phase, ...]:
  """The phases of `config.method` over a run of `total` iterations. A
  two-phase method gives its first phase round(train.phase_split * total)
  iterations; with `train.start_phase` > 0 the run is that phase alone,
  starting from `train.init_from`'s network. ValueError naming the field if
  a phase would be empty or the start cannot be made."""
  method = get(config.method)
  start = config.train.get('start_phase', 0)
  if not 0 <= start < len(method.phases):
    raise ValueError(f'train.start_phase: {config.method} has phases '
                     f'{method.phases} (0-based), got {start}')
  if start > 0:
    if not config.train.get('init_from'):
      raise ValueError(
          f'train.start_phase={start} starts {config.method} at phase '
          f'{method.phases[start]!r}, which continues from the network the '
          f'phase before it trained: set train.init_from to the workdir of '
          'a run that finished it')
    return (Phase(start, method.phases[start], 0, total),)
  if len(method.phases) == 1:
    return (Phase(0, method.phases[0], 0, total),)
  if len(method.phases) > 2:
    raise NotImplementedError('phase_plan splits runs into at most 2 phases')
  split = config.train.phase_split
  first = round(split * total)
  if not 0.0 < split < 1.0 or not 1 <= first < total:
    raise ValueError(
        f'train.phase_split: the fraction of the {total} iterations that '
        f'{config.method} spends in its first phase ({method.phases[0]!r}) '
        f'must leave both phases at least one iteration, got {split}')
  return (Phase(0, method.phases[0], 0, first),
          Phase(1, method.phases[1], first, total - first))


def phase_at(plan: tuple[Phase, ...], step: int) -> Phase:
  """The phase that iteration `step` (0-based) belongs to."""
  for phase in plan:
    if phase.start <= step < phase.start + phase.length:
      return phase
  raise ValueError(f'iteration {step} lies outside the run {plan}')


def _uniform_half_step(learner, state, train_images, train_labels,
                       meta_images, meta_labels, learning_rate,
                       meta_learning_rate, with_meta):
  del meta_images, meta_labels, meta_learning_rate, with_meta
  return l2w.uniform_half_step(learner, state, train_images, train_labels,
                               learning_rate)


register('l2w', l2w.l2w_half_step, uses_meta_step=True)
register('uniform', _uniform_half_step, uses_meta_step=False)


def _boostnet_backbone(config) -> dict:
  r = config.boostnet.reweight
  reweight = boosting.reweights(r, backbone_config(config).num_exits)
  if any(not 0.0 <= v <= 1.0 for v in reweight):
    raise ValueError(f'boostnet.reweight: each r must be in [0, 1], got {r}')
  return {'gradient_equilibrium': True, 'ensemble_reweight': reweight}


def _boostnet_options(config) -> dict:
  return {'loss_equal': bool(config.boostnet.get('loss_equal', False))}


def _boostnet_state(learner, dtype):
  if not learner.option('loss_equal'):
    return None
  return boosting.initial_loss_averages(learner.model.num_exits, dtype)


register('boostnet', batch_step=boosting.boostnet_step, uses_meta_step=False,
         backbone=_boostnet_backbone, options=_boostnet_options,
         initial_state=_boostnet_state)


for _name, _parts in regimes.REGIMES.items():
  register(_name, uses_meta_step=False, phases=tuple(
      PhaseStep(part, batch_step=functools.partial(regimes.regime_step,
                                                   part=part))
      for part in _parts))


def _imta_options(config) -> dict:
  temperature = float(config.imta.temperature)
  gamma = float(config.imta.gamma)
  if not temperature > 0:
    raise ValueError(f'imta.temperature: the distillation temperature T must '
                     f'be > 0, got {config.imta.temperature}')
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'imta.gamma: the distillation weight must be in [0, 1], '
                     f'got {config.imta.gamma}')
  if config.train.get('label_smoothing', 0.0):
    raise ValueError('train.label_smoothing: IMTA trains on plain '
                     'cross-entropy; set it to 0 for method imta')
  return {'temperature': temperature, 'gamma': gamma}


def _gradient_equilibrium(config) -> dict:
  del config
  return {'gradient_equilibrium': True}


def _imta_network(backbone):
  return imta.IMTANetwork(backbone.cfg)


_IMTA_STAGE2 = PhaseStep('stage2', batch_step=functools.partial(
    imta.imta_step, part='stage2'))
register('imta', uses_meta_step=False, backbone=_gradient_equilibrium,
         network=_imta_network, options=_imta_options, phases=(
             PhaseStep('stage1', batch_step=functools.partial(
                 imta.imta_step, part='stage1')), _IMTA_STAGE2))
register('l2w_imta', uses_meta_step=True, backbone=_gradient_equilibrium,
         network=_imta_network, options=_imta_options, phases=(
             PhaseStep('stage1', half_step=imta.l2w_stage1_half_step),
             _IMTA_STAGE2))
