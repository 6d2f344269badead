"""RANet (Yang et al., "Resolution Adaptive Networks for Efficient
Inference", CVPR 2020) as a Flax module, following `models/RANet.py` of
yangle15/RANet-pytorch layer for layer.

The stem makes one feature map per scale (index 0: the lowest resolution).
Scale flow ii has n_blocks + block_step * ii dense blocks. The lowest
resolution's are plain dense blocks; every later flow's first blocks are
fusion blocks whose layers also read the previous (lower-resolution) flow's
block outputs through `conv_up` (upsampled bilinearly with aligned corners),
the last layer of some of them downsampling (`down`); its remaining blocks
are plain. A classifier follows each block after the previous flow's last
block index, so the exits go from the lowest-resolution flow to the highest
(8 in the CIFAR setting: n_blocks 2, block_step 2, 4 scales).

Submodule names mirror the original `state_dict` (`scale_flows.0.1.
layers.2.conv_normal.net.3.weight` <-> `scale_flows_0_1/layers_2/
conv_normal/net_3/kernel`). Images are NHWC.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2w_jax.models.backbone import MultiExitBackbone
from l2w_jax.models.layers import (ConvBasic, ConvBN, ExitHead, run_stem,
                                   stem_input_layer)
from l2w_jax.models.ranet_config import (BlockSpec, RANetConfig,
                                         exit_positions, ranet_topology)


def interpolate_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """`F.interpolate(x, size, mode='bilinear', align_corners=True)` on NHWC:
  each output pixel (i, j) samples the input at (i (H-1)/(h-1),
  j (W-1)/(w-1)) with bilinear weights."""
  def weights(n_in, n_out, dtype):
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    src = jnp.arange(n_out, dtype=jnp.float32) * scale
    low = jnp.clip(jnp.floor(src).astype(jnp.int32), 0, n_in - 1)
    high = jnp.minimum(low + 1, n_in - 1)
    frac = (src - low).astype(dtype)
    return ((1 - frac)[:, None] * jax.nn.one_hot(low, n_in, dtype=dtype) +
            frac[:, None] * jax.nn.one_hot(high, n_in, dtype=dtype))

  h, w = size
  if (x.shape[1], x.shape[2]) == (h, w):
    return x  # align_corners at the same size is the identity
  rows = weights(x.shape[1], h, x.dtype)
  cols = weights(x.shape[2], w, x.dtype)
  return jnp.einsum('oh,pw,bhwc->bopc', rows, cols, x)


def _conv_bn(cfg: RANetConfig, n_in: int, n_out: int, kind: str,
             bn_width: int) -> nn.Module:
  return ConvBN(n_in, n_out, kind, True, bn_width, cfg.init, cfg.bn_axis_name,
                bn_after=cfg.bn_after, conv_gradients=cfg.conv_gradients)


class RAConvNormal(nn.Module):
  """A plain dense layer: [x, conv_normal(x)] along channels."""
  cfg: RANetConfig
  n_in: int
  n_out: int
  bn_width: int

  def setup(self):
    self.conv_normal = _conv_bn(self.cfg, self.n_in, self.n_out, 'normal',
                                self.bn_width)

  def __call__(self, x, train: bool):
    return jnp.concatenate([x, self.conv_normal(x, train)], axis=-1)


class ConvUpNormal(nn.Module):
  """A fusion layer on (low-resolution x0, x1): [x1 resized, conv_up(x0)
  resized, conv_normal(x1)], everything at conv_normal's output size."""
  cfg: RANetConfig
  n_in1: int  # x1, this flow
  n_in2: int  # x0, the earlier flow
  n_out: int
  bn_width1: int
  bn_width2: int
  down: bool

  def setup(self):
    up = math.floor(self.n_out * self.cfg.compress_factor)
    self.conv_up = _conv_bn(self.cfg, self.n_in2, up, 'normal',
                            self.bn_width2)
    self.conv_normal = _conv_bn(self.cfg, self.n_in1, self.n_out - up,
                                'down' if self.down else 'normal',
                                self.bn_width1)

  def __call__(self, low, x, train: bool):
    res = self.conv_normal(x, train)
    size = (res.shape[1], res.shape[2])
    return jnp.concatenate([interpolate_bilinear(x, size),
                            interpolate_bilinear(self.conv_up(low, train),
                                                 size), res], axis=-1)


class RABlock(nn.Module):
  """A plain ('norm') or fusion ('up') block of a scale flow.

  Returns (block output, [block input, every layer's output]); the list is
  what the next flow's fusion block of the same index reads.
  """
  cfg: RANetConfig
  spec: BlockSpec

  def setup(self):
    s, cfg = self.spec, self.cfg
    if s.kind == 'norm':
      self.layers = [RAConvNormal(cfg, s.n_in + i * s.growth, s.growth,
                                  s.bn_width) for i in range(s.n_layers)]
    else:
      self.layers = [ConvUpNormal(cfg, s.n_in + i * s.growth, s.low_widths[i],
                                  s.growth, s.bn_width, s.low_bn_width,
                                  s.down and i == s.n_layers - 1)
                     for i in range(s.n_layers)]
      width = s.outputs[s.n_layers]
      self.conv_last = ConvBasic(s.low_widths[s.n_layers],
                                 math.floor(width * cfg.compress_factor), 1, 1,
                                 0, init=cfg.init, bn_axis=cfg.bn_axis_name,
                                 conv_gradients=cfg.conv_gradients)
    if s.trans:
      before = s.outputs[s.n_layers]
      if s.kind == 'up':
        before += math.floor(before * cfg.compress_factor)
      self.trans = ConvBasic(before, s.outputs[-1], 1, 1, 0, init=cfg.init,
                             bn_axis=cfg.bn_axis_name,
                             conv_gradients=cfg.conv_gradients)

  def __call__(self, x, low, train: bool):
    outputs = [x]
    for i, layer in enumerate(self.layers):
      x = (layer(x, train) if self.spec.kind == 'norm' else
           layer(low[i], x, train))
      outputs.append(x)
    if self.spec.kind == 'up':
      size = (x.shape[1], x.shape[2])
      x = jnp.concatenate([x, interpolate_bilinear(
          self.conv_last(low[self.spec.n_layers], train), size)], axis=-1)
    if self.spec.trans:
      x = self.trans(x, train)
    return x, outputs


class RAFirstLayer(nn.Module):
  """The stem: the image to one feature map per scale, returned lowest
  resolution first."""
  cfg: RANetConfig

  def setup(self):
    cfg = self.cfg
    gr, scales = cfg.gr_factor[::-1], cfg.scale_list[::-1]
    width = cfg.n_channels * gr[0]
    first = stem_input_layer(cfg.stem, width, cfg.init, cfg.bn_axis_name,
                             cfg.conv_gradients)
    layers, s = [first], scales[0]
    for i in range(1, cfg.n_scales):
      stride = 1 if scales[i] == s else 2
      s = scales[i]
      layers.append(ConvBasic(width, cfg.n_channels * gr[i], 3, stride, 1,
                              init=cfg.init, bn_axis=cfg.bn_axis_name,
                              conv_gradients=cfg.conv_gradients))
      width = cfg.n_channels * gr[i]
    self.layers = layers

  def __call__(self, x, train: bool) -> list[jax.Array]:
    return run_stem(self.layers, x, train)[::-1]


class RANet(MultiExitBackbone):
  """Resolution adaptive network: `apply(variables, x, train)` gives the
  list of exit logits, lowest-resolution flow first, each (B, classes).

  Stage by stage (`run_stage`, `exit_step`, for the cascade and the methods
  that train or freeze parts), stage k runs every block after exit k-1's up
  to exit k's, starting the next scale flows from their stem features where
  exit k lies in a later flow. Between stages the carry is a dict:
    'stem':    the stem features of the flows not started yet;
    'x':       the current flow's last block output (B, H, W, C), what the
               exit's classifier reads;
    'outputs': per block of the current flow so far, the block's input and
               layer outputs, which the next flow's fusion blocks read
               (empty in the last flow, which no flow fuses).
  """
  cfg: RANetConfig

  def setup(self):
    self.FirstLayer = RAFirstLayer(self.cfg)  # pylint: disable=invalid-name
    topology = ranet_topology(self.cfg)
    # `train` (argument 3, self being 0) is static under remat.
    block = (nn.remat(RABlock, static_argnums=(3,)) if self.cfg.remat else
             RABlock)
    self.scale_flows = [[block(self.cfg, spec) for spec in flow]
                        for flow in topology]
    self.classifier = [ExitHead(self.cfg, spec.outputs[-1])
                       for flow in topology for spec in flow if spec.exit]

  @property
  def num_exits(self) -> int:
    return self.cfg.num_exits

  def run_stage(self, k: int, carry, train: bool) -> dict:
    """Stage k on the image (k = 0) or stage k-1's carry -> the carry at
    exit k (see the class docstring)."""
    positions = exit_positions(self.cfg)
    last_flow = self.cfg.n_scales - 1
    if k == 0:
      stem = tuple(self.FirstLayer(carry, train))
      flow, block, x, outputs = 0, -1, stem[0], ()
      stem = stem[1:]
    else:
      flow, block = positions[k - 1]
      stem, x, outputs = carry['stem'], carry['x'], carry['outputs']
    low = ()
    while (flow, block) != positions[k]:
      if block + 1 == len(self.scale_flows[flow]):
        # The flow is done: the next starts from its stem features and
        # fuses this flow's block outputs.
        flow, block, low, outputs = flow + 1, -1, outputs, ()
        x, stem = stem[0], stem[1:]
        continue
      block += 1
      module = self.scale_flows[flow][block]
      x, block_outputs = module(
          x, low[block] if module.spec.kind == 'up' else None, train)
      if flow < last_flow:
        outputs = outputs + (tuple(block_outputs),)
    return {'stem': stem, 'x': x, 'outputs': outputs}

  def exit_input(self, carry: dict) -> jax.Array:
    """An exit reads the current flow's last block output. With gradient
    equilibrium that is the tensor rescaled (`MultiExitBackbone.exit_step`):
    RANet has no coarsest scale running through all exits, so this is the
    one the classifier reads and the flow's next block continues from (the
    lower flows' outputs that later flows fuse are not rescaled). IMTA and
    BoostNet define it for MSDNet only; this is the direct transfer."""
    return carry['x']

  def with_exit_input(self, carry: dict, x: jax.Array) -> dict:
    return {**carry, 'x': x}
