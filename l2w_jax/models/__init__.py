"""Multi-exit backbones and the weight prediction network."""

import dataclasses

from l2w_jax.models import msdnet, ranet
from l2w_jax.models.msdnet import MSDNet, MSDNetConfig
from l2w_jax.models.ranet import RANet, RANetConfig
from l2w_jax.models.weight_net import WeightNet, weight_net_input_size

MODELS = ('msdnet', 'ranet')
# The mesh axis that `train.sync_bn` synchronises BatchNorm over (the one
# `l2w_jax.parallel` shards the batch along).
DATA_AXIS = 'data'


_BACKBONES = {'msdnet': (MSDNetConfig, MSDNet), 'ranet': (RANetConfig, RANet)}


def backbone_config(config):
  """The MSDNetConfig or RANetConfig that `config.model` describes (with
  `config.dataset`'s classes); ValueError naming the field if it cannot be
  built."""
  name = config.model.get('name', 'msdnet')
  if name not in MODELS:
    raise ValueError(f'model.name: unknown model {name!r}; available: '
                     f'{MODELS}')
  return _BACKBONES[name][0].from_config(config.model,
                                         config.dataset.num_classes)


def backbone_module(cfg):
  """The backbone module of a backbone config: MSDNet(cfg) or RANet(cfg)."""
  for config_class, module in _BACKBONES.values():
    if isinstance(cfg, config_class):
      return module(cfg)
  raise TypeError(f'not a backbone config: {type(cfg).__name__}')


def pooled_feature_dims(cfg) -> tuple[int, ...]:
  """Width of each exit's pooled feature (what its linear layer reads):
  `msdnet.classifier_width` of each exit (128 on the CIFAR stem, the
  exit's input channels on the ImageNet stem, unless model.classifier_width
  is set)."""
  if isinstance(cfg, RANetConfig):
    return ranet.pooled_feature_dims(cfg)
  _, classifier_in = msdnet.msdnet_topology(cfg)
  return tuple(msdnet.classifier_width(cfg, n) for n in classifier_in)


def build_model(config, **overrides):
  """The backbone that `config.model` describes, with `config.dataset`'s
  classes; with `train.sync_bn`, its BatchNorm averages over DATA_AXIS.
  `overrides` are fields a training method sets (`BackboneFields`, which
  every backbone config has)."""
  cfg = backbone_config(config)
  if config.get('train') and config.train.get('sync_bn', False):
    cfg = dataclasses.replace(cfg, bn_axis_name=DATA_AXIS)
  if config.get('meta') and config.meta.get('remat', False):
    cfg = dataclasses.replace(cfg, remat=True)
  return backbone_module(dataclasses.replace(cfg, **overrides))


def build_weight_net(meta_config, num_exits: int) -> WeightNet:
  """The weight net that `config.meta` describes, for `num_exits` exits."""
  return WeightNet(
      num_inputs=weight_net_input_size(meta_config.input, num_exits),
      num_exits=num_exits,
      hidden_size=meta_config.hidden_size,
      num_layers=meta_config.num_layers,
      output=meta_config.get('output', 'tanh'))
