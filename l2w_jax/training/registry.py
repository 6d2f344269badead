"""Training methods by name (`config.method`): what each one declares.

A method is one module that calls `register` at import time. The methods
shipped with the project are the modules of `l2w_jax.methods`, imported
when a name is first looked up; a method outside the package is named
`module:name` (e.g. `--config.method=examples.shallow_deep:sdn`), and its
module is imported to register it. Nothing else in the training loop, the
checkpoints or the evaluation knows a method by name.

A method trained in halves, as L2W-DEN trains (its uniform baseline too), is
one function

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

A method may run in phases (the training regimes: backbone, then heads;
IMTA's two stages): `register(..., phases=(PhaseStep('backbone',
batch_step=...), PhaseStep('heads', batch_step=...)))`, each phase a half
step or a whole-batch step compiled on its own; `phase_plan` splits the run
by `train.phase_split`, and the training loop restarts the learning-rate
schedule and the backbone's optimizer state at every phase boundary.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

from l2w_jax import plugins


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
  after the method, for most methods) and what it changes around them."""
  name: str
  steps: tuple[PhaseStep, ...]
  # Whether `meta.interval` iterations do a meta step (the method then has
  # a weight net: `weight_net` must be given).
  uses_meta_step: bool
  # config -> the backbone config fields the method sets (e.g. gradient
  # equilibrium, BoostNet's reweights); None: the backbone as configured.
  backbone: Callable | None = None
  # backbone (MSDNet or RANet) -> the network the method trains around it;
  # None: the backbone itself.
  network: Callable | None = None
  # (config, num_exits) -> {name: value} static hyper-parameters of the
  # method, checked (ValueError naming the field); the step reads
  # `learner.option(name)`.
  options: Callable | None = None
  # (learner, dtype) -> the initial `TrainState.method_state` (checkpointed
  # with the rest of the state); None: the method keeps no state of its own.
  initial_state: Callable | None = None
  # (config, num_exits) -> (weight net module, its optax optimizer), for a
  # method with a meta step; None: the state carries no weight net.
  weight_net: Callable | None = None
  # (learner, rng, dtype) -> the weight net's initial parameters.
  init_weight_net: Callable | None = None
  # The module that registered it (`module:name` must name it).
  module: str = ''

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
_BUILTIN_PACKAGE = 'l2w_jax.methods'
_builtins_imported = False


def register(name: str, half_step: Callable | None = None, *,
             uses_meta_step: bool = False,
             batch_step: Callable | None = None,
             phases: tuple[PhaseStep, ...] = (),
             backbone: Callable | None = None,
             network: Callable | None = None,
             options: Callable | None = None,
             initial_state: Callable | None = None,
             weight_net: Callable | None = None,
             init_weight_net: Callable | None = None) -> Method:
  """Makes a method available as `config.method = name` (or
  `module:name` from outside the package): one step (exactly one of
  `half_step` and `batch_step`) or the `phases`' steps in order. The other
  arguments are `Method`'s fields. Returns the method."""
  if name in _METHODS:
    raise ValueError(f'method {name!r} is already registered')
  if phases:
    if half_step is not None or batch_step is not None:
      raise ValueError(f'method {name!r}: give phases or one step, not both')
    steps = tuple(phases)
  else:
    steps = (PhaseStep(name, half_step, batch_step),)
  if uses_meta_step and (weight_net is None or init_weight_net is None):
    raise ValueError(f'method {name!r}: a method with a meta step needs a '
                     'weight_net and init_weight_net')
  method = Method(name, steps, uses_meta_step, backbone, network, options,
                  initial_state, weight_net, init_weight_net,
                  plugins.caller_module())
  _METHODS[name] = method
  return method


def _import_builtins() -> None:
  global _builtins_imported
  if _builtins_imported:
    return
  _builtins_imported = True
  package = importlib.import_module(_BUILTIN_PACKAGE)
  for info in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f'{_BUILTIN_PACKAGE}.{info.name}')


def available() -> tuple[str, ...]:
  """The names of the methods registered so far, the built-in ones included."""
  _import_builtins()
  return tuple(sorted(_METHODS))


def get(name: str) -> Method:
  """The method `config.method = name` trains.

  Args:
    name: a registered name, or `module:name` for a method registered by
      `module` (imported first).

  Returns:
    The `Method`. ValueError naming the available ones if there is none.
  """
  _import_builtins()
  registered = plugins.import_registering_module(name, 'method')
  if registered not in _METHODS:
    where = ' (its module does not register it)' if ':' in name else ''
    raise ValueError(f'method: unknown training method {name!r}{where}; '
                     f'available: {available()}')
  method = _METHODS[registered]
  plugins.check_registered_by(name, method.module, 'method')
  return method


def phase_plan(config, total: int) -> tuple[Phase, ...]:
  """The phases of `config.method` over a run of `total` iterations.

  A two-phase method gives its first phase round(train.phase_split * total)
  iterations; with `train.start_phase` > 0 the run is that phase alone,
  starting from `train.init_from`'s network.

  Returns:
    The phases in order. ValueError naming the field if a phase would be
    empty or the start cannot be made.
  """
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
