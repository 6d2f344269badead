"""Multi-exit backbones and the weight prediction network."""

import dataclasses
from typing import Callable

from l2w_jax import plugins
from l2w_jax.models import layers, msdnet, ranet_config
from l2w_jax.models.backbone import MultiExitBackbone
from l2w_jax.models.msdnet import MSDNet, MSDNetConfig
from l2w_jax.models.ranet import RANet, RANetConfig
from l2w_jax.models.weight_net import WeightNet, weight_net_input_size

# The mesh axis that `train.sync_bn` synchronises BatchNorm over (the one
# `l2w_jax.parallel` shards the batch along).
DATA_AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A registered backbone: `config.model.name` -> its config and module."""
  name: str
  config_class: type  # a `BackboneFields` dataclass (`from_config`)
  module_class: type  # a `MultiExitBackbone` taking `cfg`
  # cfg -> width of each exit's pooled feature (IMTA's heads read them);
  # None: the backbone does not support IMTA.
  pooled_feature_dims: Callable | None = None
  module: str = ''  # the module that registered it


_BACKBONES: dict[str, Backbone] = {}


def register_backbone(name: str, config_class: type, module_class: type,
                      pooled_feature_dims: Callable | None = None) -> Backbone:
  """Makes a backbone available as `config.model.name = name` (or
  `module:name` from outside the package, see `get_backbone`)."""
  if name in _BACKBONES:
    raise ValueError(f'backbone {name!r} is already registered')
  if not issubclass(module_class, MultiExitBackbone):
    raise TypeError(f'backbone {name!r}: {module_class.__name__} is not a '
                    'models.MultiExitBackbone')
  backbone = Backbone(name, config_class, module_class, pooled_feature_dims,
                      plugins.caller_module())
  _BACKBONES[name] = backbone
  return backbone


def get_backbone(name: str) -> Backbone:
  """The backbone `config.model.name = name` builds: a registered name, or
  `module:name` for one registered by `module` (imported first).
  ValueError naming the available ones if there is none."""
  registered = plugins.import_registering_module(name, 'model.name')
  if registered not in _BACKBONES:
    raise ValueError(f'model.name: unknown model {name!r}; available: '
                     f'{tuple(sorted(_BACKBONES))}')
  backbone = _BACKBONES[registered]
  plugins.check_registered_by(name, backbone.module, 'model.name')
  return backbone


def _backbone_of(cfg) -> Backbone:
  for backbone in _BACKBONES.values():
    if isinstance(cfg, backbone.config_class):
      return backbone
  raise TypeError(f'not a backbone config: {type(cfg).__name__}')


def backbone_config(config):
  """The backbone config (e.g. MSDNetConfig) that `config.model` describes
  (with `config.dataset`'s classes); ValueError naming the field if it
  cannot be built."""
  backbone = get_backbone(config.model.get('name', 'msdnet'))
  return backbone.config_class.from_config(config.model,
                                           config.dataset.num_classes)


def backbone_module(cfg):
  """The backbone module of a backbone config, e.g. MSDNet(cfg)."""
  return _backbone_of(cfg).module_class(cfg)


def pooled_feature_dims(cfg) -> tuple[int, ...]:
  """Width of each exit's pooled feature (what its linear layer reads)."""
  backbone = _backbone_of(cfg)
  if backbone.pooled_feature_dims is None:
    raise ValueError(f'model.name: backbone {backbone.name!r} does not give '
                     'its exits\' feature widths, which IMTA\'s heads need')
  return backbone.pooled_feature_dims(cfg)


def _msdnet_feature_dims(cfg) -> tuple[int, ...]:
  """`layers.classifier_width` of each exit (128 on the CIFAR stem, the
  exit's input channels on the ImageNet stem, unless model.classifier_width
  is set)."""
  _, classifier_in = msdnet.msdnet_topology(cfg)
  return tuple(layers.classifier_width(cfg, n) for n in classifier_in)


register_backbone('msdnet', MSDNetConfig, MSDNet, _msdnet_feature_dims)
register_backbone('ranet', RANetConfig, RANet, ranet_config.pooled_feature_dims)


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
