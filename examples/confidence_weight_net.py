r"""A weight net and a meta objective of one's own, trained by the project's
loop from the config:

  python -m experiments.main --config=configs/digits.py \
      --config.meta.weight_net=examples.confidence_weight_net:confidence \
      --config.meta.objective=examples.confidence_weight_net:mean_ce \
      --workdir=/tmp/confidence

The weight net reads each exit's confidence and a learned embedding of the
exit (L2W-DEN's reads the per-exit losses) and gives weights in (0, 2);
the meta objective is the mean cross-entropy over every exit on the meta
half (L2W-DEN's allocates each meta sample to one exit by confidence).
Registering them (`meta.pieces`) is all this file does besides defining
them; `examples/custom_weight_net.py` trains the same pieces through the
meta-step API in a loop of its own.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2w_jax.meta import pieces, weighting


class ConfidenceExitNet(nn.Module):
  """Confidences (B, K) -> weights (B, K) in (0, 2): a small MLP on each
  exit's confidence and a learned 8-d embedding of that exit."""
  num_exits: int
  hidden: int = 32

  @nn.compact
  def __call__(self, confidences):
    embedding = self.param('exit_embedding', nn.initializers.normal(0.1),
                           (self.num_exits, 8))
    x = jnp.concatenate([confidences[..., None], jnp.broadcast_to(
        embedding, confidences.shape + (8,))], axis=-1)
    return 1.0 + jnp.tanh(nn.Dense(1)(jnp.tanh(nn.Dense(self.hidden)(x))))[
        ..., 0]


def confidence_weights(weight_net: nn.Module):
  """weight_fn(meta_params, losses (B, K), exit_logits) -> weights (B, K)
  from the exits' confidences alone."""
  def weight_fn(meta_params, losses, exit_logits):
    del losses
    return weight_net.apply({'params': meta_params},
                            weighting.exit_confidences(exit_logits))
  return weight_fn


def mean_exit_loss(exit_logits, losses, labels):
  """The meta objective: the mean CE over every exit and meta sample."""
  del exit_logits, labels
  return jnp.mean(losses), None


def _build(meta_config, num_exits: int) -> ConfidenceExitNet:
  del meta_config
  return ConfidenceExitNet(num_exits)


def _init(module, rng: jax.Array, num_exits: int, dtype):
  return module.init(rng, jnp.zeros((1, num_exits), dtype))['params']


pieces.register_weight_net(
    'confidence', _build, _init,
    lambda module, settings: confidence_weights(module))
pieces.register_objective('mean_ce', lambda settings: mean_exit_loss)
