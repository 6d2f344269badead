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

from l2w_jax.models import gradient_equilibrium as ge
from l2w_jax.models.backbone import BackboneFields, parse_factors
from l2w_jax.models.ensemble import ensemble_logits
from l2w_jax.models.layers import (AvgPool2d, BatchNorm2d, Conv2d, Linear,
                                   MaxPool2d, ReLU, flatten_features)

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
    for field in ('n_blocks', 'n_channels', 'growth_rate', 'step', 'base',
                  'num_classes'):
      if int(getattr(self, field)) < 1:
        bad(field, f'must be >= 1, got {getattr(self, field)}')
    if not 0.0 <= self.reduction <= 1.0:
      bad('reduction', f'must be in [0, 1], got {self.reduction}')
    if int(self.classifier_width) < 0:
      bad('classifier_width', f"must be >= 0 (0: the original's), got "
          f'{self.classifier_width}')


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


class ConvBasic(nn.Module):
  """Conv -> BN -> ReLU (`net_0`, `net_1`, `net_2`)."""
  n_in: int
  n_out: int
  kernel: int = 3
  stride: int = 1
  padding: int = 1
  init: str = 'torch_default'
  bn_axis: str | None = None

  def setup(self):
    self.net = [
        Conv2d(self.n_in, self.n_out, self.kernel, self.stride, self.padding,
               init=self.init),
        BatchNorm2d(self.n_out, axis_name=self.bn_axis),
        ReLU(),
    ]

  def __call__(self, x, train: bool):
    conv, bn, relu = self.net
    return relu(bn(conv(x), train))


class ConvBN(nn.Module):
  """[1x1 bottleneck -> BN -> ReLU ->] 3x3 conv (stride 1 or 2) -> BN -> ReLU."""
  n_in: int
  n_out: int
  kind: str  # 'normal' or 'down'
  bottleneck: bool
  bn_width: int
  init: str = 'torch_default'
  bn_axis: str | None = None

  def setup(self):
    net = []
    n_inner = self.n_in
    if self.bottleneck:
      n_inner = min(n_inner, self.bn_width * self.n_out)
      net += [Conv2d(self.n_in, n_inner, 1, 1, 0, init=self.init),
              BatchNorm2d(n_inner, axis_name=self.bn_axis), ReLU()]
    stride = 2 if self.kind == 'down' else 1
    net += [Conv2d(n_inner, self.n_out, 3, stride, 1, init=self.init),
            BatchNorm2d(self.n_out, axis_name=self.bn_axis), ReLU()]
    self.net = net

  def __call__(self, x, train: bool):
    for layer in self.net:
      x = layer(x, train) if isinstance(layer, BatchNorm2d) else layer(x)
    return x


class ConvDownNormal(nn.Module):
  """Output at scale s: [x_s, down(x_{s-1}), normal(x_s)] along channels."""
  n_in1: int
  n_in2: int
  n_out: int
  bottleneck: bool
  bn_width1: int
  bn_width2: int
  init: str = 'torch_default'
  bn_axis: str | None = None

  def setup(self):
    self.conv_down = ConvBN(self.n_in1, self.n_out // 2, 'down',
                            self.bottleneck, self.bn_width1, self.init,
                            self.bn_axis)
    self.conv_normal = ConvBN(self.n_in2, self.n_out // 2, 'normal',
                              self.bottleneck, self.bn_width2, self.init,
                              self.bn_axis)

  def __call__(self, xs, train: bool):
    coarse = xs[1]
    return jax.numpy.concatenate(
        [coarse, self.conv_down(xs[0], train),
         self.conv_normal(coarse, train)], axis=-1)


class ConvNormal(nn.Module):
  """Output at the finest kept scale: [x, normal(x)] along channels."""
  n_in: int
  n_out: int
  bottleneck: bool
  bn_width: int
  init: str = 'torch_default'
  bn_axis: str | None = None

  def setup(self):
    self.conv_normal = ConvBN(self.n_in, self.n_out, 'normal', self.bottleneck,
                              self.bn_width, self.init, self.bn_axis)

  def __call__(self, xs, train: bool):
    x = xs[0]
    return jax.numpy.concatenate([x, self.conv_normal(x, train)], axis=-1)


class MSDNFirstLayer(nn.Module):
  """Stem: the image to one feature map per scale."""
  cfg: MSDNetConfig

  def setup(self):
    cfg, n = self.cfg, self.cfg.n_channels
    width = n * cfg.gr_factor[0]
    if cfg.stem == 'cifar':
      first = ConvBasic(3, width, 3, 1, 1, init=cfg.init,
                  bn_axis=cfg.bn_axis_name)
    else:
      first = [Conv2d(3, width, 7, 2, 3, use_bias=True, init=cfg.init),
               BatchNorm2d(width, axis_name=cfg.bn_axis_name), ReLU(),
               MaxPool2d(3, 2, 1)]
    layers = [first]
    for i in range(1, cfg.n_scales):
      layers.append(ConvBasic(n * cfg.gr_factor[i - 1], n * cfg.gr_factor[i],
                              3, 2, 1, init=cfg.init,
                              bn_axis=cfg.bn_axis_name))
    self.layers = layers

  def __call__(self, x, train: bool) -> Features:
    outputs = []
    for i, layer in enumerate(self.layers):
      if isinstance(layer, (list, tuple)):
        conv, bn, relu, pool = layer
        x = pool(relu(bn(conv(x), train)))
      else:
        x = layer(x, train)
      outputs.append(x)
    return outputs


class MSDNLayer(nn.Module):
  """One dense layer across scales, dropping the finest scale when pruned."""
  cfg: MSDNetConfig
  spec: LayerSpec

  def setup(self):
    cfg, spec = self.cfg, self.spec
    g, b = cfg.gr_factor, cfg.bn_factor
    n_in, n_out = spec.n_in, spec.n_out
    offset = cfg.n_scales - spec.out_scales
    layers = []
    if spec.in_scales > spec.out_scales:
      layers.append(ConvDownNormal(n_in * g[offset - 1], n_in * g[offset],
                                   n_out * g[offset], cfg.bottleneck,
                                   b[offset - 1], b[offset], cfg.init,
                                   cfg.bn_axis_name))
    else:
      layers.append(ConvNormal(n_in * g[offset], n_out * g[offset],
                               cfg.bottleneck, b[offset], cfg.init,
                               cfg.bn_axis_name))
    for i in range(offset + 1, cfg.n_scales):
      layers.append(ConvDownNormal(n_in * g[i - 1], n_in * g[i], n_out * g[i],
                                   cfg.bottleneck, b[i - 1], b[i], cfg.init,
                                   cfg.bn_axis_name))
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
                        init=cfg.init,
                  bn_axis=cfg.bn_axis_name) for i in range(spec.out_scales)]

  def __call__(self, xs: Features, train: bool) -> Features:
    return [m(x, train) for m, x in zip(self.m, xs)]


def classifier_width(cfg, n_in: int) -> int:
  """Channels of an exit's hidden convs (its pooled feature's width) for an
  exit reading `n_in` channels: cfg.classifier_width, or when 0 the
  original's 128 on the CIFAR stem and `n_in` on the ImageNet stem."""
  if cfg.classifier_width:
    return int(cfg.classifier_width)
  return 128 if cfg.stem == 'cifar' else n_in


class Classifier(nn.Module):
  """Exit head on the coarsest scale: 2 strided ConvBasic, AvgPool(2), Linear."""
  cfg: MSDNetConfig
  n_in: int

  def setup(self):
    cfg = self.cfg
    inter = classifier_width(cfg, self.n_in)
    self.m = [ConvBasic(self.n_in, inter, 3, 2, 1, init=cfg.init,
                  bn_axis=cfg.bn_axis_name),
              ConvBasic(inter, inter, 3, 2, 1, init=cfg.init,
                  bn_axis=cfg.bn_axis_name),
              AvgPool2d(2)]
    self.linear = Linear(inter, cfg.num_classes,
                         zero_bias=cfg.init == 'msdnet')

  def pooled_features(self, xs: Features, train: bool) -> jax.Array:
    """The pooled, flattened feature the linear layer reads: (B, width),
    width = `classifier_width(cfg, n_in)` (IMTA's heads read it too)."""
    conv1, conv2, pool = self.m
    x = pool(conv2(conv1(xs[-1], train), train))
    if x.shape[1:3] != (1, 1):
      raise ValueError(
          f'{self.name}: the coarsest scale ({xs[-1].shape[1]}x'
          f'{xs[-1].shape[2]}) pools to {x.shape[1]}x{x.shape[2]}, but the '
          'classifier, like the original, needs 1x1: image size and number '
          'of scales (len(gr_factor)) do not fit (CIFAR: 32 px, 3 scales; '
          'ImageNet: 224 px, 4 scales).')
    return flatten_features(x)

  def __call__(self, xs: Features, train: bool) -> jax.Array:
    return self.linear(self.pooled_features(xs, train))


class MSDNet(nn.Module):
  """Multi-scale dense network with one classifier after each block."""
  cfg: MSDNetConfig

  def setup(self):
    blocks, classifier_in = msdnet_topology(self.cfg)
    self.blocks = [[self._make_layer(spec) for spec in layers]
                   for layers in blocks]
    self.classifier = [Classifier(self.cfg, n) for n in classifier_in]

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
    features (an MSDNet's stage k is its block k; RANet has the same
    stage interface)."""
    for layer in self.blocks[index]:
      features = layer(features, train)
    return features

  def exit_logits(self, index: int, features: Features,
                  train: bool) -> jax.Array:
    """Classifier `index` on a block's output features: (B, num_classes)."""
    return self.classifier[index](features, train)

  def exit_step(self, i: int, features, train: bool):
    """Block i on the image (i = 0) or block i-1's features, then exit i:
    (features for block i+1, pooled feature (B, D_i), logits o_i (B, C)),
    with gradient equilibrium's rescales if configured."""
    num_blocks = self.cfg.n_blocks
    features = self.run_stage(i, features, train)
    if self.cfg.gradient_equilibrium:
      features = features[:-1] + [ge.scale_gradient(
          features[-1], ge.classifier_scale(i, num_blocks))]
    pooled = self.classifier[i].pooled_features(features, train)
    logits = self.classifier[i].linear(pooled)
    if self.cfg.gradient_equilibrium:
      features = features[:-1] + [ge.scale_gradient(
          features[-1], ge.onward_scale(i, num_blocks))]
    return features, pooled, logits

  def exit_features(self, x: jax.Array,
                    train: bool = False) -> tuple[list, list]:
    """Images (B, H, W, 3) -> (pooled features K x (B, D_k), exit logits
    K x (B, classes)); the logits are always the exits' own o_k."""
    pooled, logits = [], []
    features = x
    for i in range(self.cfg.n_blocks):
      features, feature, out = self.exit_step(i, features, train)
      pooled.append(feature)
      logits.append(out)
    return pooled, logits

  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    """Images (B, H, W, 3) -> list of per-exit logits, each (B, classes);
    BoostNet's ensembles Q_k in eval mode when `ensemble_reweight` is set."""
    _, logits = self.exit_features(x, train)
    if self.cfg.ensemble_reweight and not train:
      logits = ensemble_logits(logits, self.cfg.ensemble_reweight)
    return logits

