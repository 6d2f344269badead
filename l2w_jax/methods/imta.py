"""IMTA (Li et al., "Improved Techniques for Training Adaptive Deep
Networks", ICCV 2019; original: kalviny/IMTA).

Stage 1 trains the MSDNet with gradient equilibrium (`models.
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

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from l2w_jax.meta import weighting
from l2w_jax.models.layers import BatchNorm2d, Linear


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
                         BatchNorm2d(dims[k + 1], axis_name=self.bn_axis_name)]
                        for k in range(len(dims) - 1)]

  def __call__(self, features: Sequence[jax.Array],
               train: bool) -> list[jax.Array]:
    """K pooled features (B, D_k) -> K head logits (B, num_classes)."""
    logits, collaboration = [], None
    for k, feature in enumerate(features):
      inputs = (feature if k == 0 else
                jnp.concatenate([feature, collaboration], axis=-1))
      logits.append(self.classifier[k](inputs))
      if k < len(features) - 1:
        linear, norm = self.isc_modules[k]
        collaboration = jax.nn.relu(norm(linear(logits[-1]), train))
    return logits


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
