"""What every multi-exit backbone shares.

`BackboneFields`: the config fields the training loop and the methods set
on any backbone (their checks, the parsing of factor lists, the
construction from `config.model`). `MultiExitBackbone`: the protocol the
training methods, the evaluations, the cascade and the serving code use,
with everything that follows from a backbone's stages.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from l2w_jax.models import conv
from l2w_jax.models import gradient_equilibrium as ge
from l2w_jax.models.ensemble import ensemble_logits, ensemble_step


def parse_factors(value, field: str) -> tuple[int, ...]:
  """Accepts (1, 2, 4), [1, 2, 4], '1-2-4' or '1,2,4'."""
  if isinstance(value, str):
    parts = value.replace(',', '-').replace(' ', '').strip('()[]').split('-')
    try:
      return tuple(int(p) for p in parts if p)
    except ValueError as e:
      raise ValueError(f'model.{field}: cannot parse {value!r} as a list of '
                       'integers such as 1-2-4') from e
  return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class BackboneFields:
  """The fields of a backbone config that are not the user's `config.model`
  but set by the training loop and the methods, so that every method can
  set them on every backbone. Subclasses define `num_exits`, `stem`,
  `init` and `num_classes`, and call `check_backbone_fields` from their
  validation."""
  # Mesh axis of synchronised BatchNorm (train.sync_bn); None: per device.
  bn_axis_name: str | None = None
  # Gradient equilibrium (IMTA, BoostNet): on MSDNet's coarsest scale, on
  # the feature each RANet exit reads (backward only; see
  # `gradient_equilibrium` and `RANet.exit_step`).
  gradient_equilibrium: bool = False
  # BoostNet's reweights r_k, one per exit: in eval mode the outputs are the
  # ensembles Q_k (`ensemble.ensemble_logits`) instead of the exit logits.
  ensemble_reweight: tuple[float, ...] = ()
  # Rematerialise the backbone's layers in the backward pass
  # (`flax.linen.remat`, i.e. jax.checkpoint; `meta.remat`); same values.
  remat: bool = False
  # The convolutions' derivative rules (`conv.conv2d`), and with them
  # BatchNorm's (`batch_norm.normalise_batch`): 'auto' (the explicit ones on
  # CPU, JAX's elsewhere), 'explicit' or 'lax'; the same values to float32
  # rounding.
  conv_gradients: str = 'auto'

  @classmethod
  def from_config(cls, model_config, num_classes: int,
                  stem: str | None = None):
    """From an ml_collections `config.model`: the fields `cls` has (the
    others are ignored), with `num_classes` (and `stem`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in dict(model_config).items() if k in names}
    kwargs['num_classes'] = num_classes
    if stem is not None:
      kwargs['stem'] = stem
    return cls(**kwargs)

  def normalise_backbone_fields(self) -> None:
    """Reweights as a tuple of floats (call from `__post_init__`)."""
    object.__setattr__(self, 'ensemble_reweight',
                       tuple(float(r) for r in self.ensemble_reweight))

  def check_backbone_fields(self) -> None:
    """ValueError naming the field: stem, init, one reweight per exit,
    the convolutions' gradients."""
    def bad(field, why):
      raise ValueError(f'model.{field}: {why}')
    conv.check_gradients(self.conv_gradients)
    if self.stem not in ('cifar', 'imagenet'):
      bad('stem', f"unknown stem {self.stem!r}; use 'cifar' or 'imagenet'")
    if self.init not in ('torch_default', 'msdnet'):
      bad('init', f"unknown init {self.init!r}; use 'torch_default' or "
          "'msdnet'")
    if self.ensemble_reweight and (len(self.ensemble_reweight) !=
                                   self.num_exits):
      bad('ensemble_reweight', f'needs one value per exit ({self.num_exits}),'
          f' got {len(self.ensemble_reweight)}')

  def check_dense_widths(self, *counts: str) -> None:
    """ValueError naming the field: each of `counts` >= 1, `reduction` in
    [0, 1], `classifier_width` >= 0 (the fields of a densely connected
    multi-scale backbone)."""
    for field in counts:
      if int(getattr(self, field)) < 1:
        raise ValueError(f'model.{field}: must be >= 1, got '
                         f'{getattr(self, field)}')
    if not 0.0 <= self.reduction <= 1.0:
      raise ValueError(f'model.reduction: must be in [0, 1], got '
                       f'{self.reduction}')
    if int(self.classifier_width) < 0:
      raise ValueError("model.classifier_width: must be >= 0 (0: the "
                       f"original's), got {self.classifier_width}")


class MultiExitBackbone(nn.Module):
  """A network of K stages, each followed by an exit.

  A backbone defines its `cfg` (a `BackboneFields` config), `num_exits`,
  `classifier` (K exit heads with `pooled_features(x, train)` and `linear`,
  e.g. `layers.ExitHead`) and three functions of its *carry* (whatever one
  stage hands the next: the image before stage 0, MSDNet's list of scales,
  RANet's flows):

    run_stage(k, carry, train) -> carry   stage k (the cascade's unit)
    exit_input(carry) -> (B, H, W, C)     the feature map exit k reads
    with_exit_input(carry, x) -> carry    the carry with that map replaced

  Everything else follows here: exit logits, gradient equilibrium around
  the exits, pooled exit features, the K-exit forward pass with BoostNet's
  ensembles in eval mode, and the cascade's stage with its ensemble carry.
  """

  @property
  def num_exits(self) -> int:
    raise NotImplementedError

  def run_stage(self, k: int, carry, train: bool):
    raise NotImplementedError

  def exit_input(self, carry) -> jax.Array:
    raise NotImplementedError

  def with_exit_input(self, carry, x: jax.Array):
    raise NotImplementedError

  def exit_logits(self, k: int, carry, train: bool) -> jax.Array:
    """Exit k on stage k's carry: logits (B, num_classes)."""
    return self.classifier[k](self.exit_input(carry), train)

  def exit_step(self, k: int, carry, train: bool):
    """Stage k, then exit k: (carry for stage k+1, pooled feature (B, D_k),
    logits o_k (B, C)). With gradient equilibrium the feature map the exit
    reads is rescaled in the backward pass (`gradient_equilibrium`): by
    1/(K-k) into the exit, then by (K-k-1) onward."""
    num_exits = self.num_exits
    carry = self.run_stage(k, carry, train)
    x = self.exit_input(carry)
    if self.cfg.gradient_equilibrium:
      x = ge.scale_gradient(x, ge.classifier_scale(k, num_exits))
    pooled = self.classifier[k].pooled_features(x, train)
    logits = self.classifier[k].linear(pooled)
    if self.cfg.gradient_equilibrium:
      carry = self.with_exit_input(
          carry, ge.scale_gradient(x, ge.onward_scale(k, num_exits)))
    return carry, pooled, logits

  def exit_features(self, x: jax.Array,
                    train: bool = False) -> tuple[list, list]:
    """Images (B, H, W, 3) -> (pooled features K x (B, D_k), exit logits
    K x (B, classes)); the logits are always the exits' own o_k."""
    pooled, logits, carry = [], [], x
    for k in range(self.num_exits):
      carry, feature, out = self.exit_step(k, carry, train)
      pooled.append(feature)
      logits.append(out)
    return pooled, logits

  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    """Images (B, H, W, 3) -> K per-exit logits (B, classes); BoostNet's
    ensembles Q_k in eval mode when `cfg.ensemble_reweight` is set."""
    _, logits = self.exit_features(x, train)
    if self.cfg.ensemble_reweight and not train:
      logits = ensemble_logits(logits, self.cfg.ensemble_reweight)
    return logits

  def cascade_stage(self, k: int, carry: tuple[Any, Any]):
    """Stage k and exit k in eval mode, for early exiting: (stage carry,
    Q_{k-1} or None) -> ((stage carry, Q_k or None), the exit's prediction
    logits (B, C)): Q_k, BoostNet's ensemble, when `cfg.ensemble_reweight`
    is set, else the exit's own logits (and no Q is carried). Stage 0's
    carry is (images, None)."""
    features, ensemble = carry
    features = self.run_stage(k, features, False)
    logits = self.exit_logits(k, features, False)
    if self.cfg.ensemble_reweight:
      logits = ensemble_step(logits, ensemble, k, self.cfg.ensemble_reweight)
      return (features, logits), logits
    return (features, None), logits
