r"""A third backbone registered from outside the package: a tiny multi-exit
CNN, `config.model.name = 'examples.tiny_backbone:tiny_cnn'`:

  python -m experiments.main --config=configs/digits.py \
      --config.model.name=examples.tiny_backbone:tiny_cnn --workdir=/tmp/tiny

Stage 0 halves the image twice (two strided ConvBasic), every later stage
is one ConvBasic at that resolution with `model.tiny_widths[k]` channels;
exit k pools stage k's map to 1x1 and applies a linear layer. Any method
trains it, and the budgeted evaluation, the cascade and the export run it,
because it implements `models.MultiExitBackbone`: `run_stage`,
`exit_input`, `with_exit_input`, `num_exits` and `classifier` (exit heads
with `pooled_features` and `linear`). This file is the whole backbone.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2w_jax.models import register_backbone
from l2w_jax.models.backbone import (BackboneFields, MultiExitBackbone,
                                     parse_factors)
from l2w_jax.models.layers import ConvBasic, Linear

NAME = 'tiny_cnn'


@dataclasses.dataclass(frozen=True)
class TinyCNNConfig(BackboneFields):
  """Fields read from `config.model` (the others there are ignored)."""
  tiny_widths: tuple[int, ...] = (8, 16, 32)  # channels of each stage
  stem: str = 'cifar'
  num_classes: int = 10
  init: str = 'torch_default'

  def __post_init__(self):
    object.__setattr__(self, 'tiny_widths',
                       parse_factors(self.tiny_widths, 'tiny_widths'))
    self.normalise_backbone_fields()
    if not self.tiny_widths or min(self.tiny_widths) < 1:
      raise ValueError('model.tiny_widths: one width >= 1 per stage, got '
                       f'{self.tiny_widths}')
    self.check_backbone_fields()

  @property
  def num_exits(self) -> int:
    return len(self.tiny_widths)


class PooledLinearHead(nn.Module):
  """Average pool over the whole map, then a linear layer."""
  n_in: int
  num_classes: int

  def setup(self):
    self.linear = Linear(self.n_in, self.num_classes)

  def pooled_features(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, n_in) -> (B, n_in)."""
    del train
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return self.linear(self.pooled_features(x, train))


class TinyCNN(MultiExitBackbone):
  """One exit after each stage; the carry is the stage's feature map."""
  cfg: TinyCNNConfig

  def setup(self):
    cfg, widths = self.cfg, self.cfg.tiny_widths

    def conv(n_in, n_out, stride):
      return ConvBasic(n_in, n_out, 3, stride, 1, init=cfg.init,
                       bn_axis=cfg.bn_axis_name)

    self.stages = [[conv(3, widths[0], 2), conv(widths[0], widths[0], 2)]] + [
        [conv(widths[k - 1], widths[k], 1)] for k in range(1, len(widths))]
    self.classifier = [PooledLinearHead(w, cfg.num_classes) for w in widths]

  @property
  def num_exits(self) -> int:
    return self.cfg.num_exits

  def run_stage(self, k: int, x, train: bool) -> jax.Array:
    for layer in self.stages[k]:
      x = layer(x, train)
    return x

  def exit_input(self, x: jax.Array) -> jax.Array:
    return x

  def with_exit_input(self, x: jax.Array, new: jax.Array) -> jax.Array:
    del x
    return new


register_backbone(NAME, TinyCNNConfig, TinyCNN,
                  pooled_feature_dims=lambda cfg: tuple(cfg.tiny_widths))
