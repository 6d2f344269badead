"""IMTA (Li et al., "Improved Techniques for Training Adaptive Deep
Networks", ICCV 2019; original: kalviny/IMTA).

Stage 1 trains the backbone (the original's MSDNet; a RANet works the same
way, see `RANet.exit_step`) with gradient equilibrium (`models.
gradient_equilibrium`) on the plain sum of the exits' cross-entropies. Stage
2 freezes that network (its BatchNorm still in train mode, so its running
statistics keep moving, as `model.train()` does in the original) and trains
new heads (`IMTAHeads`) on the pooled features of the old classifiers:

  head 0 reads feature 0; head k > 0 reads [feature k, ISC_{k-1}(logits k-1)]
  ISC_k = ReLU(BN1d(Linear(num_classes -> D_{k+1})))   (inline subnetwork
  collaboration; not detached, so later heads' losses reach earlier heads)

with one-for-all knowledge distillation from the frozen network's own last
exit t (`main_IMTA.py` + `utils.KDLoss` of the original):

  loss = CE(o_{K-1}) + sum_{k<K-1} [(1-gamma) CE(o_k)
                                    + gamma T^2 KL(softmax(t/T) || softmax(o_k/T))]

where KL is `nn.KLDivLoss()`'s default reduction: the mean over batch *and*
classes, not per sample.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2w_jax.meta import weighting
from l2w_jax.methods import partial
from l2w_jax.models import backbone_module, pooled_feature_dims
from l2w_jax.models.layers import BatchNorm2d, Linear, ReLU
from l2w_jax.training import registry
from l2w_jax.training.forward import top1_hits
from l2w_jax.training.state import Learner, TrainState, compute_dtype


class IMTAHeads(nn.Module):
  """The stage-2 heads and ISC modules; parameter names mirror the
  original's `classifier.k` and `isc_modules.k.{0,1}`.

  `feature_dims[k]` is the width of exit k's pooled feature (128 on CIFAR).
  """
  feature_dims: tuple[int, ...]
  num_classes: int
  bn_axis_name: str | None = None

  def setup(self):
    dims, classes = self.feature_dims, self.num_classes
    self.classifier = [Linear(d if k == 0 else 2 * d, classes)
                       for k, d in enumerate(dims)]
    self.isc_modules = [[Linear(classes, dims[k + 1]),
                         BatchNorm2d(dims[k + 1], axis_name=self.bn_axis_name),
                         ReLU()]
                        for k in range(len(dims) - 1)]

  def head(self, k: int, feature: jax.Array, collaboration, train: bool):
    """Head k on its pooled feature (B, D_k) and the previous head's ISC
    output (None for k = 0) -> (logits (B, C), ISC output for head k + 1,
    None after the last head)."""
    inputs = (feature if k == 0 else
              jnp.concatenate([feature, collaboration], axis=-1))
    logits = self.classifier[k](inputs)
    if k == len(self.feature_dims) - 1:
      return logits, None
    linear, norm, relu = self.isc_modules[k]
    return logits, relu(norm(linear(logits), train))

  def __call__(self, features: Sequence[jax.Array],
               train: bool) -> list[jax.Array]:
    """K pooled features (B, D_k) -> K head logits (B, num_classes)."""
    logits, collaboration = [], None
    for k, feature in enumerate(features):
      out, collaboration = self.head(k, feature, collaboration, train)
      logits.append(out)
    return logits


class IMTANetwork(nn.Module):
  """The network the `imta` method trains: the gradient-equilibrium
  backbone (`net`, stage 1; an MSDNet as in the original's `IMTA_MSDNet`,
  or a RANet) and the stage-2 heads with ISC (`heads`).

  Called, it gives the heads' logits (what the original evaluates after
  stage 2); `backbone_logits` gives the backbone's own exits (stage 1).
  Exit k runs stage k, the old classifier k (whose pooled feature head k
  reads, and whose linear layer the original also computes), then ISC k-1
  and head k, so the FLOPs counter's running total at head k's linear layer
  is exit k's cost.
  """
  cfg: object  # MSDNetConfig or RANetConfig

  def setup(self):
    self.net = backbone_module(self.cfg)
    self.heads = IMTAHeads(pooled_feature_dims(self.cfg),
                           self.cfg.num_classes, self.cfg.bn_axis_name)

  @property
  def num_exits(self) -> int:
    return self.cfg.num_exits

  def backbone_logits(self, x: jax.Array, train: bool) -> list[jax.Array]:
    """The backbone's exits o_k, each (B, C) (stage 1's outputs)."""
    return self.net(x, train)

  def stage2_outputs(self, x: jax.Array, train: bool):
    """(head logits K x (B, C), the backbone's own exit logits K x (B, C)),
    exit by exit."""
    heads, backbone, features, collaboration = [], [], x, None
    for k in range(self.num_exits):
      features, feature, own = self.net.exit_step(k, features, train)
      logits, collaboration = self.heads.head(k, feature, collaboration,
                                              train)
      heads.append(logits)
      backbone.append(own)
    return heads, backbone

  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    """Images (B, H, W, 3) -> the heads' logits, each (B, num_classes)."""
    return self.stage2_outputs(x, train)[0]

  @staticmethod
  def is_exit_layer(path: tuple[str, ...]) -> bool:
    """Whether the leaf layer at `path` is an exit's last layer (for the
    FLOPs counter): the heads' linear layers."""
    return len(path) >= 2 and path[-2] == 'heads' and path[-1].startswith(
        'classifier_')


def kl_divergence_mean(student_logits: jax.Array, teacher_logits: jax.Array,
                       temperature: float) -> jax.Array:
  """`nn.KLDivLoss()(log_softmax(s/T), softmax(t/T))`: the element-wise mean
  over (B, C) of p (log p - log q), with 0 log 0 = 0."""
  p = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return jnp.mean(jax.scipy.special.xlogy(p, p) - p * log_q)


def distillation_loss(head_logits: Sequence[jax.Array],
                      teacher_logits: jax.Array, labels: jax.Array,
                      temperature: float, gamma: float) -> jax.Array:
  """IMTA's stage-2 loss (module doc), accumulated in the original's order;
  the teacher gets no gradient."""
  teacher = jax.lax.stop_gradient(teacher_logits)
  cross_entropy = jnp.mean(weighting.per_exit_losses(head_logits, labels),
                           axis=0)
  last = len(head_logits) - 1
  loss = cross_entropy[last]
  for k in range(last):
    loss = loss + (1 - gamma) * cross_entropy[k]
    loss = loss + (kl_divergence_mean(head_logits[k], teacher, temperature)
                   * gamma * temperature * temperature)
  return loss


STAGES = ('stage1', 'stage2')


def imta_step(learner: Learner, state: TrainState, images, labels,
              learning_rate, *, part: str):
  """One SGD step of IMTA's stage `part` on a whole (per-device) batch.

  stage1: the gradient-equilibrium backbone (`net`) on the plain sum of its
  exits' batch-mean cross-entropies; the heads neither run nor change.
  stage2: the heads and ISC modules on `distillation_loss`, the teacher
  being `net`'s own last exit; `net` is frozen but runs in train mode, so
  its running statistics keep moving (the original's `model.train()`).
  T and gamma are `learner.option('temperature' / 'gamma')`.

  Returns (new_state, metrics) as the methods registry documents;
  `loss_per_exit` and `correct` are those of the stage's outputs (the old
  exits, then the heads), `weight_per_exit` each exit's cross-entropy
  coefficient.
  """
  model = learner.model
  num_exits = model.num_exits
  mask = {'net': part == 'stage1', 'heads': part == 'stage2'}
  trainable, frozen = partial.split(state.params, mask)
  dtype = compute_dtype(learner.settings)
  x = images if dtype is None else images.astype(dtype)
  temperature, gamma = learner.option('temperature'), learner.option('gamma')

  def loss_fn(trainable):
    variables = {'params': {**frozen, **trainable},
                 'batch_stats': state.batch_stats}
    method = (IMTANetwork.backbone_logits if part == 'stage1' else
              IMTANetwork.stage2_outputs)
    outputs, moved = model.apply(variables, x, True, method=method,
                                 mutable=['batch_stats'])
    if dtype is not None:
      outputs = jax.tree_util.tree_map(lambda z: z.astype(jnp.float32),
                                       outputs)
    if part == 'stage1':
      exit_logits = outputs
      losses = jnp.mean(weighting.per_exit_losses(exit_logits, labels),
                        axis=0)
      loss = jnp.sum(losses)
    else:
      exit_logits, backbone = outputs
      losses = jnp.mean(weighting.per_exit_losses(exit_logits, labels),
                        axis=0)
      loss = distillation_loss(exit_logits, backbone[-1], labels,
                               temperature, gamma)
    return loss, (losses, exit_logits, moved['batch_stats'])

  (train_loss, (losses, exit_logits, batch_stats)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(trainable))
  params, opt_state = partial.masked_sgd_update(learner, state, grads, mask,
                                                learning_rate)
  coefficients = (jnp.ones((num_exits,)) if part == 'stage1' else
                  jnp.full((num_exits,), 1.0 - gamma).at[-1].set(1.0))
  new_state = state.replace(
      params=params, batch_stats=learner.reduce_batch_stats(batch_stats),
      opt_state=opt_state)
  return new_state, {
      'train_loss': train_loss, 'loss_per_exit': losses,
      'weight_per_exit': coefficients,
      'correct': top1_hits([jax.lax.stop_gradient(z)
                                for z in exit_logits], labels)}


def options_from_config(config, num_exits: int) -> dict:
  """IMTA's options: the distillation's temperature T and weight gamma."""
  del num_exits
  temperature = float(config.imta.temperature)
  gamma = float(config.imta.gamma)
  if not temperature > 0:
    raise ValueError(f'imta.temperature: the distillation temperature T must '
                     f'be > 0, got {config.imta.temperature}')
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f'imta.gamma: the distillation weight must be in [0, 1], '
                     f'got {config.imta.gamma}')
  if config.train.get('label_smoothing', 0.0):
    raise ValueError('train.label_smoothing: IMTA trains on plain '
                     f'cross-entropy; set it to 0 for method {config.method}')
  return {'temperature': temperature, 'gamma': gamma}


def gradient_equilibrium(config) -> dict:
  """The backbone fields IMTA sets: gradient equilibrium on."""
  del config
  return {'gradient_equilibrium': True}


def network(backbone) -> IMTANetwork:
  """The network IMTA trains around `backbone`: it and the heads."""
  return IMTANetwork(backbone.cfg)


STAGE2 = registry.PhaseStep('stage2', batch_step=functools.partial(
    imta_step, part='stage2'))

registry.register('imta', backbone=gradient_equilibrium, network=network,
                  options=options_from_config, phases=(
                      registry.PhaseStep('stage1', batch_step=functools.partial(
                          imta_step, part='stage1')), STAGE2))
