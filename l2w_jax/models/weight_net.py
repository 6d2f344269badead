"""The weight prediction network of L2W-DEN (`MLP_tanh` / `MLP` of the original).

Linear(in -> H), ReLU, [Linear(H -> H), ReLU] x (num_layers - 1),
Linear(H -> K), then tanh (default) or sigmoid. Submodule names follow the
original's `state_dict` (`first_hidden_layer.fc`, `rest_hidden_layers.0.fc`,
`output_layer`); every layer keeps PyTorch's default initialisation.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from l2w_jax.models.layers import Linear

INPUT_KINDS = ('loss', 'conf', 'both')
OUTPUTS = ('tanh', 'sigmoid')


def weight_net_input_size(input_kind: str, num_exits: int) -> int:
  """Inputs of g: K losses, K confidences, or both (2K)."""
  if input_kind not in INPUT_KINDS:
    raise ValueError(f'meta.input: unknown input {input_kind!r}; use one of '
                     f'{INPUT_KINDS}')
  return 2 * num_exits if input_kind == 'both' else num_exits


class HiddenLayer(nn.Module):
  """Linear (`fc`) followed by ReLU."""
  n_in: int
  n_out: int

  def setup(self):
    self.fc = Linear(self.n_in, self.n_out)

  def __call__(self, x):
    return nn.relu(self.fc(x))


class WeightNet(nn.Module):
  """(B, in) per-sample statistics -> (B, K) raw weights in (-1, 1) or (0, 1)."""
  num_inputs: int
  num_exits: int
  hidden_size: int = 500
  num_layers: int = 1
  output: str = 'tanh'

  def setup(self):
    if self.num_layers < 1:
      raise ValueError(f'meta.num_layers: must be >= 1, got {self.num_layers}')
    if self.hidden_size < 1:
      raise ValueError(f'meta.hidden_size: must be >= 1, got '
                       f'{self.hidden_size}')
    if self.output not in OUTPUTS:
      raise ValueError(f'meta.output: unknown output {self.output!r}; use one '
                       f'of {OUTPUTS}')
    self.first_hidden_layer = HiddenLayer(self.num_inputs, self.hidden_size)
    self.rest_hidden_layers = [
        HiddenLayer(self.hidden_size, self.hidden_size)
        for _ in range(self.num_layers - 1)
    ]
    self.output_layer = Linear(self.hidden_size, self.num_exits)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.first_hidden_layer(x)
    for layer in self.rest_hidden_layers:
      x = layer(x)
    x = self.output_layer(x)
    return nn.tanh(x) if self.output == 'tanh' else nn.sigmoid(x)
