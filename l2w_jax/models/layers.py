"""Leaf layers with PyTorch semantics, as Flax Linen modules.

Images are NHWC. Each layer reproduces its `torch.nn` counterpart exactly:
symmetric explicit padding (Flax's 'SAME' pads stride-2 convs asymmetrically),
BatchNorm that normalises with the biased batch variance but moves the running
variance with the unbiased one, and PyTorch's default initialisers (which is
what the original MSDNet effectively uses, see `models/msdnet.py`).

Every layer that takes channels checks them against the width it was declared
with, so an architecture whose arithmetic does not add up fails loudly, as the
original does, instead of silently inferring another width.

The blocks both backbones build from (`ConvBasic`, `ConvBN`) and their exit
head (`ExitHead`) are here too.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from l2w_jax.models import batch_norm
from l2w_jax.models import conv as conv_lib


def torch_uniform_init(fan_in: int):
  """PyTorch's default init for conv / linear weights and biases.

  `kaiming_uniform_(a=sqrt(5))` on weights and the bias rule both reduce to
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  """
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def msdnet_conv_init(kernel_size: int, out_features: int):
  """The init MSDNet's `_init_weights` intended: N(0, sqrt(2 / (k*k*out)))."""
  std = math.sqrt(2.0 / (kernel_size * kernel_size * out_features))

  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.normal(key, shape, dtype)

  return init


def _check_width(layer: nn.Module, got: int, expected: int) -> None:
  if got != expected:
    raise ValueError(
        f'{layer.__class__.__name__} {layer.name!r} expects {expected} input '
        f'channels but receives {got}: the architecture configuration does not '
        'add up (check growth_rate, gr_factor, bn_factor and reduction).')


class Conv2d(nn.Module):
  """`torch.nn.Conv2d` on NHWC inputs: (B, H, W, in) -> (B, H', W', out).

  Kernel layout HWIO. `init` is 'torch_default' or 'msdnet' (see module doc);
  `gradients` chooses the derivative rules (`conv.conv2d`: 'auto', 'explicit'
  or 'lax'; the same values to float32 rounding).
  """
  in_features: int
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = False
  init: str = 'torch_default'
  gradients: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_width(self, x.shape[-1], self.in_features)
    k = self.kernel_size
    fan_in = self.in_features * k * k
    if self.init == 'msdnet':
      kernel_init = msdnet_conv_init(k, self.features)
    else:
      kernel_init = torch_uniform_init(fan_in)
    kernel = self.param('kernel', kernel_init,
                        (k, k, self.in_features, self.features), x.dtype)
    y = conv_lib.conv2d(x, kernel.astype(x.dtype), self.stride, self.padding,
                        self.gradients)
    if self.use_bias:
      bias = self.param('bias', torch_uniform_init(fan_in), (self.features,),
                        x.dtype)
      y = y + bias.astype(x.dtype)
    return y


class Linear(nn.Module):
  """`torch.nn.Linear`: (B, in) -> (B, out); kernel layout (in, out)."""
  in_features: int
  features: int
  zero_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_width(self, x.shape[-1], self.in_features)
    init = torch_uniform_init(self.in_features)
    kernel = self.param('kernel', init, (self.in_features, self.features),
                        x.dtype)
    bias_init = nn.initializers.zeros if self.zero_bias else init
    bias = self.param('bias', bias_init, (self.features,), x.dtype)
    return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


class BatchNorm2d(nn.Module):
  """`torch.nn.BatchNorm2d` (eps 1e-5, momentum 0.1) over NHWC inputs.

  Train mode normalises with the batch mean and biased variance and, when the
  'batch_stats' collection is mutable, moves the running statistics with the
  *unbiased* variance, as PyTorch does. Eval mode uses the running statistics.
  `gradients` ('auto', 'explicit' or 'lax', the backbone's
  `conv_gradients`): with the explicit rules the training-mode
  normalisation of one device's batch has `batch_norm`'s one-pass
  derivative (synchronised BatchNorm keeps JAX's).
  """
  features: int
  momentum: float = 0.1
  epsilon: float = 1e-5
  # A mesh axis name: batch statistics over all its devices (SyncBatchNorm;
  # equal shards per device). None: this device's batch only.
  axis_name: str | None = None
  gradients: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    _check_width(self, x.shape[-1], self.features)
    c = self.features
    # Statistics and the normalisation in at least float32: with bfloat16
    # activations (train.compute_dtype) only the output is bfloat16.
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    out_dtype, x = x.dtype, x.astype(dtype)
    scale = self.param('scale', nn.initializers.ones, (c,), dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,),
                                 dtype)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (c,), dtype)
    if not train:
      return batch_norm.normalise(
          x, running_mean.value.astype(dtype), running_var.value.astype(dtype),
          scale, bias, self.epsilon).astype(out_dtype)
    y, mean, var = batch_norm.normalise_batch(
        x, scale, bias, self.epsilon,
        conv_lib.uses_explicit_gradients(self.gradients), self.axis_name)
    if not self.is_initializing() and self.is_mutable_collection(
        'batch_stats'):
      n = math.prod(x.shape[:-1])
      if self.axis_name is not None:
        n *= lax.axis_size(self.axis_name)
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      running_mean.value = ((1 - m) * running_mean.value +
                            m * lax.stop_gradient(mean))
      running_var.value = ((1 - m) * running_var.value +
                           m * lax.stop_gradient(unbiased))
    return y.astype(out_dtype)


class ReLU(nn.Module):
  """`torch.nn.ReLU`; a module so that the FLOPs counter can see it."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.relu(x)


class MaxPool2d(nn.Module):
  """`torch.nn.MaxPool2d(kernel, stride, padding)` on NHWC (pads with -inf)."""
  kernel_size: int
  stride: int
  padding: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s, p = self.kernel_size, self.stride, self.padding
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1),
                             ((0, 0), (p, p), (p, p), (0, 0)))


class AvgPool2d(nn.Module):
  """`torch.nn.AvgPool2d(kernel)` (stride = kernel, no padding) on NHWC."""
  kernel_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    if x.shape[1] < k or x.shape[2] < k:
      raise ValueError(
          f'AvgPool2d({k}) needs a feature map of at least {k}x{k}, got '
          f'{x.shape[1]}x{x.shape[2]}: the input images are too small.')
    summed = lax.reduce_window(x, 0.0, lax.add, (1, k, k, 1), (1, k, k, 1),
                               'VALID')
    return summed / (k * k)


def flatten_features(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, C*H*W) in PyTorch's (C, H, W) order."""
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class ConvBasic(nn.Module):
  """Conv -> BN -> ReLU (`net_0`, `net_1`, `net_2`)."""
  n_in: int
  n_out: int
  kernel: int = 3
  stride: int = 1
  padding: int = 1
  init: str = 'torch_default'
  bn_axis: str | None = None
  conv_gradients: str = 'auto'

  def setup(self):
    self.net = [
        Conv2d(self.n_in, self.n_out, self.kernel, self.stride, self.padding,
               init=self.init, gradients=self.conv_gradients),
        BatchNorm2d(self.n_out, axis_name=self.bn_axis,
                    gradients=self.conv_gradients),
        ReLU(),
    ]

  def __call__(self, x, train: bool):
    conv, bn, relu = self.net
    return relu(bn(conv(x), train))


def stem_input_layer(stem: str, width: int, init: str,
                     bn_axis: str | None, conv_gradients: str = 'auto'):
  """The stem's first layer, from the image's 3 channels to `width`: a 3x3
  ConvBasic on the CIFAR stem, the 7x7/2 conv -> BN -> ReLU -> 3x3/2 max
  pool on the ImageNet stem (a list, so that its parameters keep the
  original's `layers_0_0` ... names). Call from a module's `setup`."""
  if stem == 'cifar':
    return ConvBasic(3, width, 3, 1, 1, init=init, bn_axis=bn_axis,
                     conv_gradients=conv_gradients)
  return [Conv2d(3, width, 7, 2, 3, use_bias=True, init=init,
                 gradients=conv_gradients),
          BatchNorm2d(width, axis_name=bn_axis, gradients=conv_gradients),
          ReLU(), MaxPool2d(3, 2, 1)]


def run_stem(layers, x: jax.Array, train: bool) -> list[jax.Array]:
  """Runs a stem's layers in a chain (the first from `stem_input_layer`).

  Args:
    layers: the stem's layers, each ConvBasic-like or a list from
      `stem_input_layer`.
    x: images, (B, H, W, 3).
    train: batch statistics in BatchNorm (and their update) when True.
  Returns:
    every layer's output, in order: (B, H_i, W_i, C_i) each.
  """
  outputs = []
  for layer in layers:
    if isinstance(layer, (list, tuple)):
      conv, bn, relu, pool = layer
      x = pool(relu(bn(conv(x), train)))
    else:
      x = layer(x, train)
    outputs.append(x)
  return outputs


class ConvBN(nn.Module):
  """A dense layer's conv: [1x1 bottleneck -> BN -> ReLU ->] 3x3 conv
  (stride 1 or 2) -> BN -> ReLU; with `bn_after=False` (RANet's bnAfter
  off, bottleneck always) pre-activated: BN -> ReLU -> 1x1 -> BN -> ReLU ->
  3x3."""
  n_in: int
  n_out: int
  kind: str  # 'normal' or 'down'
  bottleneck: bool
  bn_width: int
  init: str = 'torch_default'
  bn_axis: str | None = None
  bn_after: bool = True
  conv_gradients: str = 'auto'

  def setup(self):
    stride = 2 if self.kind == 'down' else 1
    bn_relu = lambda n: [BatchNorm2d(n, axis_name=self.bn_axis,
                                     gradients=self.conv_gradients), ReLU()]
    n_inner = self.n_in
    if self.bottleneck or not self.bn_after:
      n_inner = min(n_inner, self.bn_width * self.n_out)
    squeeze = lambda: [Conv2d(self.n_in, n_inner, 1, 1, 0, init=self.init,
                              gradients=self.conv_gradients)]
    conv = lambda: [Conv2d(n_inner, self.n_out, 3, stride, 1, init=self.init,
                           gradients=self.conv_gradients)]
    if not self.bn_after:
      self.net = bn_relu(self.n_in) + squeeze() + bn_relu(n_inner) + conv()
    elif self.bottleneck:
      self.net = squeeze() + bn_relu(n_inner) + conv() + bn_relu(self.n_out)
    else:
      self.net = conv() + bn_relu(self.n_out)

  def __call__(self, x, train: bool):
    for layer in self.net:
      x = layer(x, train) if isinstance(layer, BatchNorm2d) else layer(x)
    return x


def classifier_width(cfg, n_in: int) -> int:
  """Channels of an exit's hidden convs (its pooled feature's width) for an
  exit reading `n_in` channels: cfg.classifier_width, or when 0 the
  original's 128 on the CIFAR stem and `n_in` on the ImageNet stem."""
  if cfg.classifier_width:
    return int(cfg.classifier_width)
  return 128 if cfg.stem == 'cifar' else n_in


class ExitHead(nn.Module):
  """The exit classifier of MSDNet and RANet (their originals'
  ClassifierModule): 2 strided ConvBasic, AvgPool(2), Linear, on the one
  feature map the exit reads. `cfg` is the backbone's config (its
  `num_classes`, `init`, `bn_axis_name`, `classifier_width`, `stem`)."""
  cfg: Any
  n_in: int

  def setup(self):
    cfg = self.cfg
    inter = classifier_width(cfg, self.n_in)
    self.m = [ConvBasic(self.n_in, inter, 3, 2, 1, init=cfg.init,
                        bn_axis=cfg.bn_axis_name,
                        conv_gradients=cfg.conv_gradients),
              ConvBasic(inter, inter, 3, 2, 1, init=cfg.init,
                        bn_axis=cfg.bn_axis_name,
                        conv_gradients=cfg.conv_gradients),
              AvgPool2d(2)]
    self.linear = Linear(inter, cfg.num_classes,
                         zero_bias=cfg.init == 'msdnet')

  def pooled_features(self, x: jax.Array, train: bool) -> jax.Array:
    """Feature map (B, H, W, n_in) -> the pooled, flattened feature the
    linear layer reads: (B, width), width = `classifier_width(cfg, n_in)`
    (IMTA's heads read it too). ValueError unless it pools to 1x1."""
    conv1, conv2, pool = self.m
    pooled = pool(conv2(conv1(x, train), train))
    if pooled.shape[1:3] != (1, 1):
      raise ValueError(
          f'{self.name}: the feature map it reads ({x.shape[1]}x'
          f'{x.shape[2]}) pools to {pooled.shape[1]}x{pooled.shape[2]}, but '
          'the exit head, like the original, needs 1x1: image size, stem and '
          'number of scales do not fit (CIFAR: 32 px; ImageNet: 224 px)')
    return flatten_features(pooled)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """(B, H, W, n_in) -> logits (B, num_classes)."""
    return self.linear(self.pooled_features(x, train))
