"""Multi-exit backbones and the weight prediction network."""

from l2w_jax.models.msdnet import MSDNet, MSDNetConfig
from l2w_jax.models.weight_net import WeightNet, weight_net_input_size

MODELS = ('msdnet',)


def build_model(config):
  """The backbone that `config.model` describes, with `config.dataset`'s classes."""
  name = config.model.get('name', 'msdnet')
  if name == 'msdnet':
    return MSDNet(MSDNetConfig.from_config(config.model,
                                           config.dataset.num_classes))
  raise ValueError(f'model.name: unknown model {name!r}; available: {MODELS}')


def build_weight_net(meta_config, num_exits: int) -> WeightNet:
  """The weight net that `config.meta` describes, for `num_exits` exits."""
  return WeightNet(
      num_inputs=weight_net_input_size(meta_config.input, num_exits),
      num_exits=num_exits,
      hidden_size=meta_config.hidden_size,
      num_layers=meta_config.num_layers,
      output=meta_config.get('output', 'tanh'))
