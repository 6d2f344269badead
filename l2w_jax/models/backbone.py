"""What every backbone config (MSDNetConfig, RANetConfig) shares: the
fields the training loop and the methods set, their checks, the parsing of
factor lists and the construction from `config.model`."""

from __future__ import annotations

import dataclasses


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
    """ValueError naming the field: stem, init, one reweight per exit."""
    def bad(field, why):
      raise ValueError(f'model.{field}: {why}')
    if self.stem not in ('cifar', 'imagenet'):
      bad('stem', f"unknown stem {self.stem!r}; use 'cifar' or 'imagenet'")
    if self.init not in ('torch_default', 'msdnet'):
      bad('init', f"unknown init {self.init!r}; use 'torch_default' or "
          "'msdnet'")
    if self.ensemble_reweight and (len(self.ensemble_reweight) !=
                                   self.num_exits):
      bad('ensemble_reweight', f'needs one value per exit ({self.num_exits}),'
          f' got {len(self.ensemble_reweight)}')
