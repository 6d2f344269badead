"""L2W-DEN's sample weighting in IMTA's first stage, then IMTA's second
(`config.method = 'l2w_imta'`): the combination the L2W-DEN paper reports
with IMTA's distillation heads. Stage 1 is `l2w.l2w_half_step` on the
gradient-equilibrium backbone inside the IMTA network, stage 2 IMTA's own.
"""

from __future__ import annotations

import dataclasses

from l2w_jax.methods import imta, l2w
from l2w_jax.models import backbone_module
from l2w_jax.optim import sgd_momentum, with_sgd_momentum
from l2w_jax.training import registry
from l2w_jax.training.state import Learner, TrainState


def _network_part(state: TrainState) -> TrainState:
  """The state of `net` alone: its parameters, statistics and momentum
  (the optimizer's hyper-parameters shared)."""
  return state.replace(
      params=state.params['net'], batch_stats=state.batch_stats['net'],
      opt_state=with_sgd_momentum(state.opt_state,
                                  sgd_momentum(state.opt_state)['net']))


def _with_network_part(state: TrainState, part: TrainState) -> TrainState:
  """`state` with `net`'s entries taken from `part` (see `_network_part`)."""
  momentum = {**sgd_momentum(state.opt_state),
              'net': sgd_momentum(part.opt_state)}
  return state.replace(
      params={**state.params, 'net': part.params},
      batch_stats={**state.batch_stats, 'net': part.batch_stats},
      opt_state=with_sgd_momentum(part.opt_state, momentum),
      meta_params=part.meta_params, meta_opt_state=part.meta_opt_state)


def l2w_stage1_half_step(learner: Learner, state: TrainState, train_images,
                         train_labels, meta_images, meta_labels,
                         learning_rate, meta_learning_rate, with_meta):
  """`l2w_imta`'s first stage: L2W-DEN's half step (`l2w.l2w_half_step`) on
  the gradient-equilibrium backbone inside the IMTA network; the heads are
  frozen (they neither run nor change). Same signature and metrics as the
  L2W half step."""
  network_learner = dataclasses.replace(
      learner, model=backbone_module(learner.model.cfg))
  part, metrics = l2w.l2w_half_step(
      network_learner, _network_part(state), train_images, train_labels,
      meta_images, meta_labels, learning_rate, meta_learning_rate, with_meta)
  return _with_network_part(state, part), metrics


def _options(config, num_exits: int) -> dict:
  return {**imta.options_from_config(config, num_exits),
          **l2w.options_from_config(config, num_exits)}


registry.register('l2w_imta', uses_meta_step=True,
                  backbone=imta.gradient_equilibrium, network=imta.network,
                  options=_options, weight_net=l2w.weight_net_from_config,
                  init_weight_net=l2w.init_weight_net,
                  phases=(registry.PhaseStep(
                      'stage1', half_step=l2w_stage1_half_step), imta.STAGE2))
