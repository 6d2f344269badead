"""SGD on part of a network: the other top-level modules stay frozen.

Frozen modules are outside the optimizer, as `requires_grad=False` modules
left out of a PyTorch optimizer are: no gradient, no weight decay, no
momentum. A mask maps each top-level parameter group (e.g. `blocks_0_0`,
`classifier_2`, or `net` / `heads`) to whether it trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from l2w_jax.training.state import Learner, TrainState
from l2w_jax.optim import apply_optimizer, sgd_momentum, with_sgd_momentum


def split(params: dict, mask: dict) -> tuple[dict, dict]:
  """(trainable groups, frozen groups) of `params` by `mask`."""
  return ({k: v for k, v in params.items() if mask[k]},
          {k: v for k, v in params.items() if not mask[k]})


def select(mask: dict, new: dict, old: dict) -> dict:
  """Per top-level group: `new` where the mask is True, `old` elsewhere."""
  return {name: new[name] if mask[name] else old[name] for name in new}


def masked_sgd_update(learner: Learner, state: TrainState, grads: dict,
                      mask: dict, learning_rate):
  """One `learner.tx` (torch SGD) step of the trainable groups.

  `grads` holds the trainable groups only; they are reduced across devices
  (`learner.reduce_grads`). Returns (params, opt_state) in which the frozen
  groups' parameters and momentum buffers are exactly the old ones.
  """
  _, frozen = split(state.params, mask)
  grads = {**jax.tree_util.tree_map(jnp.zeros_like, frozen), **grads}
  params, opt_state = apply_optimizer(learner.tx, learner.reduce_grads(grads),
                                      state.opt_state, state.params,
                                      learning_rate)
  params = select(mask, params, state.params)
  opt_state = with_sgd_momentum(opt_state, select(
      mask, sgd_momentum(opt_state), sgd_momentum(state.opt_state)))
  return params, opt_state
