"""Multi-exit backbones and the weight prediction network."""

import dataclasses

from l2w_jax.models.msdnet import MSDNet, MSDNetConfig
from l2w_jax.models.ranet import RANet, RANetConfig
from l2w_jax.models.weight_net import WeightNet, weight_net_input_size

MODELS = ('msdnet', 'ranet')
# The mesh axis that `train.sync_bn` synchronises BatchNorm over (the one
# `l2w_jax.parallel` shards the batch along).
DATA_AXIS = 'data'


def build_model(config, **overrides):
  """The backbone that `config.model` describes, with `config.dataset`'s
  classes; with `train.sync_bn`, its BatchNorm averages over DATA_AXIS.
  `overrides` are MSDNetConfig fields a training method sets."""
  name = config.model.get('name', 'msdnet')
  if name not in MODELS:
    raise ValueError(f'model.name: unknown model {name!r}; available: '
                     f'{MODELS}')
  config_class, module = {'msdnet': (MSDNetConfig, MSDNet),
                          'ranet': (RANetConfig, RANet)}[name]
  cfg = config_class.from_config(config.model, config.dataset.num_classes)
  if config.get('train') and config.train.get('sync_bn', False):
    cfg = dataclasses.replace(cfg, bn_axis_name=DATA_AXIS)
  unknown = set(overrides) - {f.name for f in dataclasses.fields(cfg)}
  if unknown:
    raise ValueError(
        f'method: {config.get("method")!r} changes the backbone '
        f'({sorted(unknown)}), which model.name={name!r} does not have; it '
        'runs on msdnet')
  return module(dataclasses.replace(cfg, **overrides))


def build_weight_net(meta_config, num_exits: int) -> WeightNet:
  """The weight net that `config.meta` describes, for `num_exits` exits."""
  return WeightNet(
      num_inputs=weight_net_input_size(meta_config.input, num_exits),
      num_exits=num_exits,
      hidden_size=meta_config.hidden_size,
      num_layers=meta_config.num_layers,
      output=meta_config.get('output', 'tanh'))
