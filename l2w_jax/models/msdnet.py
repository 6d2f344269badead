"""MSDNet (Huang et al., 2018) as Flax Linen modules, topology-exact.

The topology is that of `kalviny/MSDNet-PyTorch`, reused unchanged by
L2W-DEN: CIFAR and ImageNet stems and classifiers, `even` / `lin_grow` steps,
`max` / `min` pruning of scales, bottlenecks of width `bn_factor * out`, and
transition layers that compress channels by `reduction`. Submodules carry the
names of the original's `state_dict` (``blocks.0.1.layers.2.conv_down.net.3``
is ``blocks_0_1/layers_2/conv_down/net_3`` here), so that conversion between
the two is a renaming plus layout transposes (`l2w_jax.convert`).

Quirk reproduced: the original's `_init_weights` is applied to the children of
each block (`MSDNFirstLayer`, `MSDNLayer`, ...), never to a `Conv2d` or
`Linear`, so every layer keeps PyTorch's default initialisation. That is the
default here (`init='torch_default'`); `init='msdnet'` gives the initialisation
the original intended (conv N(0, sqrt(2/(k*k*out))), classifier biases zero).

Inputs are NHWC images; `MSDNet.apply(variables, x, train)` returns the list
of per-exit logits (B, num_classes); with ``mutable=['batch_stats']`` in train
mode it also returns the moved running statistics.
"""

from __future__ import annotations

import dataclasses
import math
import flax.linen as nn
import jax

from l2w_jax.models.backbone import (BackboneFields, MultiExitBackbone,
                                     parse_factors)
from l2w_jax.models.layers import (ConvBasic, ConvBN, ExitHead, run_stem,
                                   stem_input_layer)

Features = list  # list of (B, H_s, W_s, C_s) arrays, finest scale first.


@dataclasses.dataclass(frozen=True)
class MSDNetConfig(BackboneFields):
  """Hyper-parameters of an MSDNet; names follow `config.model` (and the
  fields the methods set, `BackboneFields`)."""
  n_blocks: int = 5
  n_channels: int = 16
  growth_rate: int = 6
  gr_factor: tuple[int, ...] = (1, 2, 4)
  bn_factor: tuple[int, ...] = (1, 2, 4)
  step_mode: str = 'lin_grow'
  step: int = 1
  base: int = 1
  prune: str = 'max'
  bottleneck: bool = True
  reduction: float = 0.5
  stem: str = 'cifar'
  num_classes: int = 100
  init: str = 'torch_default'
  # Channels of the exits' two hidden convs; 0: the original's (128 on the
  # CIFAR stem, the exit's input channels on the ImageNet stem).
  classifier_width: int = 0

  def __post_init__(self):
    object.__setattr__(self, 'gr_factor',
                       parse_factors(self.gr_factor, 'gr_factor'))
    object.__setattr__(self, 'bn_factor',
                       parse_factors(self.bn_factor, 'bn_factor'))
    self.normalise_backbone_fields()
    self.validate()

  @property
  def n_scales(self) -> int:
    return len(self.gr_factor)

  @property
  def num_exits(self) -> int:
    return self.n_blocks

  def validate(self) -> None:
    """Raises ValueError naming the field of a configuration that cannot be built."""
    def bad(field, why):
      raise ValueError(f'model.{field}: {why}')
    if self.step_mode not in ('even', 'lin_grow'):
      bad('step_mode', f"unknown step mode {self.step_mode!r}; use 'even' or "
          "'lin_grow'")
    if self.prune not in ('max', 'min'):
      bad('prune', f"unknown pruning {self.prune!r}; use 'max' or 'min'")
    self.check_backbone_fields()
    if not self.gr_factor:
      bad('gr_factor', 'needs at least one scale')
    if len(self.bn_factor) != len(self.gr_factor):
      bad('bn_factor', f'has {len(self.bn_factor)} entries but gr_factor has '
          f'{len(self.gr_factor)}; give one bottleneck factor per scale')
    if any(f < 1 for f in self.gr_factor):
      bad('gr_factor', f'factors must be >= 1, got {self.gr_factor}')
    if any(f < 1 for f in self.bn_factor):
      bad('bn_factor', f'factors must be >= 1, got {self.bn_factor}')
    self.check_dense_widths('n_blocks', 'n_channels', 'growth_rate', 'step',
                            'base', 'num_classes')


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One layer of a block: the stem, an MSDN layer or a transition."""
  kind: str  # 'first', 'msdn' or 'transition'
  n_in: int  # channels per unit of grFactor entering the layer
  n_out: int  # growth (msdn) or compressed width (transition)
  in_scales: int
  out_scales: int


def block_steps(cfg: MSDNetConfig) -> list[int]:
  """Number of MSDN layers in each block."""
  steps = [cfg.base]
  for i in range(1, cfg.n_blocks):
    steps.append(cfg.step if cfg.step_mode == 'even' else cfg.step * i + 1)
  return steps


def msdnet_topology(cfg: MSDNetConfig) -> tuple[list[list[LayerSpec]],
                                                list[int]]:
  """The original's `_build_block` arithmetic.

  Returns the layers of each block and the input width of each exit's
  classifier (channels at the coarsest scale).
  """
  steps = block_steps(cfg)
  n_all, n_curr = sum(steps), 0
  s = cfg.n_scales
  n_in = cfg.n_channels
  blocks, classifier_in = [], []
  for i in range(cfg.n_blocks):
    layers = [LayerSpec('first', 3, n_in, 0, s)] if n_curr == 0 else []
    for _ in range(steps[i]):
      n_curr += 1
      if cfg.prune == 'min':
        in_s = min(s, n_all - n_curr + 2)
        out_s = min(s, n_all - n_curr + 1)
      else:
        interval = math.ceil(n_all / s)
        in_s = s - math.floor(max(0, n_curr - 2) / interval)
        out_s = s - math.floor((n_curr - 1) / interval)
      layers.append(LayerSpec('msdn', n_in, cfg.growth_rate, in_s, out_s))
      n_in += cfg.growth_rate
      if cfg.prune == 'max':
        transition = in_s > out_s and cfg.reduction > 0
      else:
        transition = cfg.reduction > 0 and n_curr in (
            math.floor(n_all / 3), math.floor(2 * n_all / 3))
      if transition:
        n_out = math.floor(cfg.reduction * n_in)
        layers.append(LayerSpec('transition', n_in, n_out, out_s, out_s))
        n_in = n_out
    blocks.append(layers)
    classifier_in.append(n_in * cfg.gr_factor[-1])
  return blocks, classifier_in


class ScaleUnit(nn.Module):
  """One scale of an MSDN layer. With a finer input (`n_in_fine` > 0) the
  output is [x_s, down(x_{s-1}), normal(x_s)] along channels, each conv
  making half the growth; at the finest kept scale it is [x_s, normal(x_s)]
  (the original's ConvDownNormal and ConvNormal)."""
  n_in_fine: int  # channels of x_{s-1}; 0: none
  n_in: int  # channels of x_s
  n_out: int
  bottleneck: bool
  bn_width_fine: int
  bn_width: int
  init: str = 'torch_default'
  bn_axis: str | None = None
  conv_gradients: str = 'auto'

  def setup(self):
    growth = self.n_out // 2 if self.n_in_fine else self.n_out
    if self.n_in_fine:
      self.conv_down = ConvBN(self.n_in_fine, growth, 'down', self.bottleneck,
                              self.bn_width_fine, self.init, self.bn_axis,
                              conv_gradients=self.conv_gradients)
    self.conv_normal = ConvBN(self.n_in, growth, 'normal', self.bottleneck,
                              self.bn_width, self.init, self.bn_axis,
                              conv_gradients=self.conv_gradients)

  def __call__(self, xs, train: bool):
    x = xs[-1]
    down = [self.conv_down(xs[0], train)] if self.n_in_fine else []
    return jax.numpy.concatenate(
        [x] + down + [self.conv_normal(x, train)], axis=-1)


class MSDNFirstLayer(nn.Module):
  """Stem: the image to one feature map per scale."""
  cfg: MSDNetConfig

  def setup(self):
    cfg, n = self.cfg, self.cfg.n_channels
    width = n * cfg.gr_factor[0]
    first = stem_input_layer(cfg.stem, width, cfg.init, cfg.bn_axis_name,
                             cfg.conv_gradients)
    layers = [first]
    for i in range(1, cfg.n_scales):
      layers.append(ConvBasic(n * cfg.gr_factor[i - 1], n * cfg.gr_factor[i],
                              3, 2, 1, init=cfg.init,
                              bn_axis=cfg.bn_axis_name,
                              conv_gradients=cfg.conv_gradients))
    self.layers = layers

  def __call__(self, x, train: bool) -> Features:
    return run_stem(self.layers, x, train)


class MSDNLayer(nn.Module):
  """One dense layer across scales, dropping the finest scale when pruned."""
  cfg: MSDNetConfig
  spec: LayerSpec

  def setup(self):
    cfg, spec = self.cfg, self.spec
    g, b = cfg.gr_factor, cfg.bn_factor
    n_in, n_out = spec.n_in, spec.n_out
    offset = cfg.n_scales - spec.out_scales
    # Scale i reads x_{i-1} too, except the finest kept scale of an
    # unpruned layer.
    first_fine = offset if spec.in_scales > spec.out_scales else offset + 1
    layers = []
    for i in range(offset, cfg.n_scales):
      fine = i >= first_fine
      layers.append(ScaleUnit(n_in * g[i - 1] if fine else 0, n_in * g[i],
                              n_out * g[i], cfg.bottleneck,
                              b[i - 1] if fine else 0, b[i], cfg.init,
                              cfg.bn_axis_name, cfg.conv_gradients))
    self.layers = layers

  def __call__(self, xs: Features, train: bool) -> Features:
    out_s = self.spec.out_scales
    if self.spec.in_scales > out_s:
      inputs = [[xs[i - 1], xs[i]] for i in range(1, out_s + 1)]
    else:
      inputs = [[xs[0]]] + [[xs[i - 1], xs[i]] for i in range(1, out_s)]
    return [layer(inp, train) for layer, inp in zip(self.layers, inputs)]


class Transition(nn.Module):
  """1x1 ConvBasic per kept scale, compressing channels (`m_i`)."""
  cfg: MSDNetConfig
  spec: LayerSpec

  def setup(self):
    cfg, spec = self.cfg, self.spec
    offset = cfg.n_scales - spec.out_scales
    self.m = [ConvBasic(spec.n_in * cfg.gr_factor[offset + i],
                        spec.n_out * cfg.gr_factor[offset + i], 1, 1, 0,
                        init=cfg.init, bn_axis=cfg.bn_axis_name,
                        conv_gradients=cfg.conv_gradients)
              for i in range(spec.out_scales)]

  def __call__(self, xs: Features, train: bool) -> Features:
    return [m(x, train) for m, x in zip(self.m, xs)]


class MSDNet(MultiExitBackbone):
  """Multi-scale dense network with one exit after each block (the carry
  between stages: the list of scales, finest first)."""
  cfg: MSDNetConfig

  def setup(self):
    blocks, classifier_in = msdnet_topology(self.cfg)
    self.blocks = [[self._make_layer(spec) for spec in layers]
                   for layers in blocks]
    self.classifier = [ExitHead(self.cfg, n) for n in classifier_in]

  def _make_layer(self, spec: LayerSpec) -> nn.Module:
    if spec.kind == 'first':
      return MSDNFirstLayer(self.cfg)
    layer = MSDNLayer if spec.kind == 'msdn' else Transition
    if self.cfg.remat:  # `train` (argument 2, self being 0) is static
      layer = nn.remat(layer, static_argnums=(2,))
    return layer(self.cfg, spec)

  @property
  def num_exits(self) -> int:
    return self.cfg.n_blocks

  def run_stage(self, index: int, features, train: bool) -> Features:
    """Block `index` on the image (index 0) or the previous block's
    features: an MSDNet's stage k is its block k."""
    for layer in self.blocks[index]:
      features = layer(features, train)
    return features

  def exit_input(self, features: Features) -> jax.Array:
    """An exit reads the coarsest scale."""
    return features[-1]

  def with_exit_input(self, features: Features, x: jax.Array) -> Features:
    return features[:-1] + [x]

