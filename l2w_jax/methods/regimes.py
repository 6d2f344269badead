"""The training regimes of Kubaty et al., "How to Train Your Multi-Exit
Model? Analyzing the Impact of Training Strategies" (original:
kamadforge/early-exit-benchmark; its rules are written down in
docs/originals/regimes.md).

A regime is a sequence of phases, each training one part of the network on
whole batches with SGD:

  'backbone'  the blocks and the last classifier on the last exit's
              cross-entropy alone (the original trains a plain network with
              its own final classifier; the other classifiers do not exist
              yet, so here they neither run nor change);
  'heads'     the other classifiers on the frozen backbone, whose BatchNorm
              (the last classifier's included, it belongs to the backbone)
              runs in eval mode: running statistics used, never moved;
  'all'       everything.

  disjoint = backbone, then heads;  joint = all;  mixed = backbone, then all.

The loss of the 'heads' and 'all' phases is the mean over all K exits of the
batch-mean cross-entropy, the frozen last exit included (the original's
`sum(losses) / len(losses)`, so every head's gradient carries 1/K). Frozen
parameters are outside the optimizer, as in the original: no weight decay,
no momentum; each phase starts with a fresh optimizer state and its own
learning-rate schedule (the original runs the phases as separate jobs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from l2w_jax.meta import weighting
from l2w_jax.methods import partial
from l2w_jax.training import registry
from l2w_jax.training.forward import top1_hits
from l2w_jax.training.state import Learner, TrainState, compute_dtype

PARTS = ('backbone', 'heads', 'all')
REGIMES = {
    'regime_disjoint': ('backbone', 'heads'),
    'regime_joint': ('all',),
    'regime_mixed': ('backbone', 'all'),
}


def trains_exit(part: str, exit_index: int, num_exits: int) -> bool:
  """Whether classifier `exit_index` is trained in a `part` phase."""
  is_last = exit_index == num_exits - 1
  return {'backbone': is_last, 'heads': not is_last, 'all': True}[part]


def trainable_mask(params, part: str, num_exits: int) -> dict:
  """{top-level module name: whether it trains} for a `part` phase: the
  exits' `classifier_k` by exit, every other module (MSDNet's `blocks_i_j`,
  RANet's stem and scale flows) as the backbone."""
  mask = {}
  for name in params:
    if name.startswith('classifier_'):
      mask[name] = trains_exit(part, int(name.rsplit('_', 1)[1]), num_exits)
    else:
      mask[name] = part != 'heads'
  return mask


def exits_run(part: str, num_exits: int) -> tuple[int, ...]:
  """The exits a `part` phase computes: the last alone, or all."""
  return (num_exits - 1,) if part == 'backbone' else tuple(range(num_exits))


def exit_coefficients(part: str, num_exits: int) -> jax.Array:
  """(K,) the coefficient of each exit's batch-mean CE in the phase loss:
  one-hot on the last exit for 'backbone', 1/K everywhere otherwise."""
  if part == 'backbone':
    return jnp.zeros((num_exits,)).at[num_exits - 1].set(1.0)
  return jnp.full((num_exits,), 1.0 / num_exits)


def regime_logits(model, variables, images, part: str):
  """Train-step logits of the exits a `part` phase computes (`exits_run`),
  and the moved batch statistics.

  'backbone' runs only the last exit's classifier; 'heads' runs the backbone
  and the last classifier in eval mode and the other classifiers in train
  mode; 'all' runs everything in train mode.
  """
  num_exits = model.num_exits
  exits = exits_run(part, num_exits)

  def forward(module, x):
    features, out = x, []
    for k in range(exits[-1] + 1):
      features = module.run_stage(k, features, train=part != 'heads')
      if k in exits:
        out.append(module.exit_logits(
            k, features, train=trains_exit(part, k, num_exits)))
    return out

  logits, moved = model.apply(variables, images, method=forward,
                              mutable=['batch_stats'])
  return logits, moved['batch_stats']


def phase_loss(exit_logits, labels, part: str, num_exits: int,
               label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(loss, (K,) batch-mean CE per exit, 0 for exits not run) of a `part`
  phase: sum_k coefficient_k * CE_k (`exit_coefficients`), summed in exit
  order like the original's `sum(losses) / len(losses)`."""
  per_exit = jnp.mean(weighting.per_exit_losses(exit_logits, labels,
                                                label_smoothing), axis=0)
  losses = jnp.zeros((num_exits,), per_exit.dtype).at[
      jnp.asarray(exits_run(part, num_exits))].set(per_exit)
  if part == 'backbone':
    return per_exit[-1], losses
  return jnp.sum(per_exit) / num_exits, losses


def regime_step(learner: Learner, state: TrainState, images, labels,
                learning_rate, *, part: str):
  """One SGD step of a `part` phase on a whole (per-device) batch.

  Gradients are taken for the trainable modules only; the frozen modules'
  parameters, momentum buffers and batch statistics come out unchanged.
  Returns (new_state, metrics) as the methods registry documents;
  `weight_per_exit` holds the exits' coefficients in the loss, `correct` and
  `loss_per_exit` are 0 for exits the phase does not run.
  """
  model = learner.model
  num_exits = model.num_exits
  mask = trainable_mask(state.params, part, num_exits)
  trainable, frozen = partial.split(state.params, mask)

  def loss_fn(trainable):
    variables = {'params': {**frozen, **trainable},
                 'batch_stats': state.batch_stats}
    dtype = compute_dtype(learner.settings)
    exit_logits, moved = regime_logits(
        model, variables, images if dtype is None else images.astype(dtype),
        part)
    if dtype is not None:
      exit_logits = [z.astype(jnp.float32) for z in exit_logits]
    loss, losses = phase_loss(exit_logits, labels, part, num_exits,
                              learner.settings.label_smoothing)
    return loss, (losses, exit_logits, moved)

  (train_loss, (losses, exit_logits, batch_stats)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(trainable))
  params, opt_state = partial.masked_sgd_update(learner, state, grads, mask,
                                                learning_rate)
  run_hits = top1_hits([jax.lax.stop_gradient(z) for z in exit_logits],
                           labels)
  hits = jnp.zeros((num_exits,), run_hits.dtype).at[
      jnp.asarray(exits_run(part, num_exits))].set(run_hits)
  new_state = state.replace(
      params=params, batch_stats=learner.reduce_batch_stats(batch_stats),
      opt_state=opt_state)
  return new_state, {'train_loss': train_loss, 'loss_per_exit': losses,
                     'weight_per_exit': exit_coefficients(part, num_exits),
                     'correct': hits}


for _name, _parts in REGIMES.items():
  registry.register(_name, phases=tuple(
      registry.PhaseStep(part, batch_step=functools.partial(regime_step,
                                                            part=part))
      for part in _parts))
