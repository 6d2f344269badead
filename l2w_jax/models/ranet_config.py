"""RANet's config and architecture arithmetic (the blocks of every scale
flow, where the exits sit, each exit's feature width), following
`models/RANet.py` of yangle15/RANet-pytorch; the modules are in
`models/ranet.py`."""

from __future__ import annotations

import dataclasses
import math

from l2w_jax.models.backbone import BackboneFields, parse_factors
from l2w_jax.models.layers import classifier_width


@dataclasses.dataclass(frozen=True)
class RANetConfig(BackboneFields):
  """Hyper-parameters of a RANet; names follow `config.model` (the
  original's arguments in snake_case; and the fields the methods set,
  `BackboneFields`)."""
  n_blocks: int = 2
  n_channels: int = 16
  growth_rate: int = 6
  gr_factor: tuple[int, ...] = (4, 2, 1, 1)
  bn_factor: tuple[int, ...] = (4, 2, 1, 1)
  block_step: int = 2
  scale_list: tuple[int, ...] = (1, 2, 3, 3)
  compress_factor: float = 0.25
  step: int = 4
  step_mode: str = 'even'
  bn_after: bool = True
  reduction: float = 0.5
  stem: str = 'cifar'
  num_classes: int = 10
  # 'msdnet': N(0, sqrt(2 / (k k out))) convs, zero linear biases, which the
  # original's _init_weights applies; 'torch_default': PyTorch's defaults.
  init: str = 'msdnet'
  # Channels of the exits' two hidden convs; 0: the original's (128 on the
  # CIFAR stem, the exit block's width on the ImageNet stem).
  classifier_width: int = 0

  def __post_init__(self):
    for field in ('gr_factor', 'bn_factor', 'scale_list'):
      object.__setattr__(self, field,
                         parse_factors(getattr(self, field), field))
    self.normalise_backbone_fields()
    self.validate()

  @property
  def n_scales(self) -> int:
    return len(self.scale_list)

  @property
  def blocks_per_flow(self) -> tuple[int, ...]:
    """(0, n_blocks, n_blocks + block_step, ...): the original's nBlocks."""
    return (0,) + tuple(self.block_step * i + self.n_blocks
                        for i in range(self.n_scales))

  @property
  def num_exits(self) -> int:
    return sum(b - a for a, b in zip(self.blocks_per_flow,
                                     self.blocks_per_flow[1:]))

  def validate(self) -> None:
    """Raises ValueError naming the fields of a RANet that cannot be built."""
    def bad(field, why):
      raise ValueError(f'model.{field}: {why}')
    if self.step_mode not in ('even', 'lg'):
      bad('step_mode', f"unknown RANet step mode {self.step_mode!r}; use "
          "'even' or 'lg'")
    self.check_backbone_fields()
    if not self.scale_list:
      bad('scale_list', 'needs at least one scale')
    for field in ('gr_factor', 'bn_factor'):
      if len(getattr(self, field)) != self.n_scales:
        bad(field, f'has {len(getattr(self, field))} entries but scale_list '
            f'has {self.n_scales}; give one per scale')
    if any(f < 1 for f in self.gr_factor + self.bn_factor):
      bad('gr_factor', 'factors (and bn_factor) must be >= 1')
    if self.scale_list[0] != 1 or any(
        b - a not in (0, 1)
        for a, b in zip(self.scale_list, self.scale_list[1:])):
      bad('scale_list', 'must start at 1 and grow by 0 or 1 from scale to '
          f'scale (the stem halves the resolution between them), got '
          f'{self.scale_list}')
    self.check_dense_widths('n_blocks', 'n_channels', 'growth_rate', 'step',
                            'num_classes')
    if self.block_step < 0:
      bad('block_step', f'must be >= 0, got {self.block_step}')
    if self.n_scales > 1 and self.step < 2:
      bad('step', 'RANet fusion blocks need at least 2 layers (step >= 2)')
    if self.reduction == 0.0:  # RANet's transitions always compress
      bad('reduction', 'must be in (0, 1], got 0.0')
    if not 0.0 <= self.compress_factor < 1.0:
      bad('compress_factor', f'must be in [0, 1), got {self.compress_factor}')
    for ii in range(1, self.n_scales):
      if math.floor(self.growth_rate * self.gr_factor[ii] *
                    self.compress_factor) < 1:
        raise ValueError(
            f'model.compress_factor, model.growth_rate, model.gr_factor: '
            f'scale {ii} fuses floor({self.compress_factor} x '
            f'{self.growth_rate * self.gr_factor[ii]}) = 0 channels from the '
            'scale below (a convolution with no output): raise growth_rate '
            'or compress_factor')
      # Flow ii starts scale_list[ii] - 1 halvings above the lowest
      # resolution and must reach it (where every exit pools to 1x1) through
      # its downsampling fusion blocks.
      downs = set(_down_blocks(self, ii))
      if len(downs) != self.scale_list[ii] - 1:
        raise ValueError(
            f'model.scale_list, model.n_blocks, model.block_step: scale {ii} '
            f'(scale_list {self.scale_list}) starts '
            f'{self.scale_list[ii] - 1} halvings above the lowest '
            f'resolution, but n_blocks={self.n_blocks} and '
            f'block_step={self.block_step} give it {len(downs)} '
            'downsampling blocks: use block_step >= 1, or fewer resolution '
            'steps in scale_list')


def _down_blocks(cfg: RANetConfig, ii: int) -> tuple[int, ...]:
  """The 1-based fusion-block indices of flow ii whose last layer
  downsamples: the original's `nBlocks[:ii+1][-(scale_list[ii]-1):]` (for
  scale 1 that slice is the whole list, as in Python)."""
  counts = cfg.blocks_per_flow[:ii + 1]
  return tuple(b for b in counts[-(cfg.scale_list[ii] - 1):] if b >= 1)


def _transition(n_block: int, n_blocks_all: int, in_scale: int) -> bool:
  """The original's `_trans_flag`."""
  return any(n_block == math.floor((i + 1) * n_blocks_all / in_scale)
             for i in range(in_scale - 1))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One block of a scale flow, as the original's constructor builds it."""
  kind: str  # 'norm' or 'up'
  n_in: int
  n_layers: int
  growth: int
  trans: bool
  bn_width: int
  down: bool = False
  low_widths: tuple[int, ...] = ()  # earlier flow's block i outputs
  low_bn_width: int = 1
  outputs: tuple[int, ...] = ()  # widths of [input, layer 1, ..., block out]
  exit: bool = False


def ranet_topology(cfg: RANetConfig) -> list[list[BlockSpec]]:
  """The blocks of every scale flow with their channel arithmetic (the
  original's `RANet.__init__`, including its shared `steps` list)."""
  counts = cfg.blocks_per_flow
  steps = [cfg.step]
  flows, low = [], []
  for ii in range(cfg.n_scales):
    n_in = cfg.n_channels * cfg.gr_factor[ii]
    growth = cfg.growth_rate * cfg.gr_factor[ii]
    flow, outs = [], []
    for i in range(counts[ii + 1]):
      n_block = i + 1
      trans = _transition(n_block, counts[ii + 1], cfg.scale_list[ii])
      n_layers = steps[n_block - 1]
      widths = [n_in + k * growth for k in range(n_layers + 1)]
      if n_block > counts[ii]:
        last = widths[-1]
        spec = BlockSpec('norm', n_in, n_layers, growth, trans,
                         cfg.bn_factor[ii], exit=True)
        steps.append(cfg.step if cfg.step_mode == 'even' else
                     steps[-1] + cfg.step)
      else:
        if len(low[i]) < n_layers + 1:
          raise ValueError(
              f'model.step_mode: fusion block {n_block} of scale {ii} has '
              f'{n_layers} layers but the block it fuses has only '
              f'{len(low[i]) - 1}')
        last = widths[-1] + math.floor(widths[-1] * cfg.compress_factor)
        spec = BlockSpec('up', n_in, n_layers, growth, trans,
                         cfg.bn_factor[ii], down=n_block in _down_blocks(
                             cfg, ii), low_widths=tuple(low[i]),
                         low_bn_width=cfg.bn_factor[ii - 1])
      if trans:
        last = math.floor(1.0 * cfg.reduction * last)
      spec = dataclasses.replace(spec, outputs=tuple(widths) + (last,))
      flow.append(spec)
      outs.append(widths)
      n_in = last
    flows.append(flow)
    low = outs
  return flows


def exit_positions(cfg: RANetConfig) -> tuple[tuple[int, int], ...]:
  """(flow, block) of every exit in exit order (0-based indices)."""
  return tuple((ii, i) for ii, flow in enumerate(ranet_topology(cfg))
               for i, spec in enumerate(flow) if spec.exit)


def pooled_feature_dims(cfg: RANetConfig) -> tuple[int, ...]:
  """Width of each exit's pooled feature (`classifier_width`): 128 on the
  CIFAR stem, the exit block's output channels on the ImageNet stem."""
  return tuple(classifier_width(cfg, spec.outputs[-1])
               for flow in ranet_topology(cfg) for spec in flow if spec.exit)
