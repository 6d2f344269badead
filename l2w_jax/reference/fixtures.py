"""Reading reference fixtures (`.npz` files of the original's numbers) and
comparing results with the tolerances of `shared/reference/README.md`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from l2w_jax.models.msdnet import MSDNet, MSDNetConfig
from l2w_jax.models.ranet import RANet, RANetConfig

EXPECTED = 'expected'

# The original's argparse defaults, used for architecture keys a fixture omits.
_ORIGINAL_DEFAULTS = {
    'nBlocks': 1, 'nChannels': 32, 'base': 4, 'step': 1, 'growthRate': 6,
    'grFactor': '1-2-4', 'bnFactor': '1-2-4', 'prune': 'max',
    'bottleneck': True, 'reduction': 0.5,
}
_CLASSES_OF_DATA = {'cifar10': 10, 'cifar100': 100, 'imagenet': 1000}


class FixtureError(ValueError):
  """A fixture that cannot be run: unknown kind, missing keys, bad config."""


@dataclasses.dataclass
class Fixture:
  """An opened fixture: its arrays and its parsed `config_json`."""
  path: str
  arrays: dict[str, np.ndarray]
  config: dict[str, Any]

  @property
  def kind(self) -> str:
    return self.config['kind']

  @property
  def name(self) -> str:
    return os.path.basename(self.path)

  def require(self, keys: Sequence[str]) -> None:
    """Raises FixtureError naming every key of `keys` the archive lacks."""
    missing = [k for k in keys if k not in self.arrays]
    if missing:
      raise FixtureError(f'{self.name}: fixture of kind {self.kind!r} lacks '
                         f'entries {missing}')

  def require_config(self, keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in self.config]
    if missing:
      raise FixtureError(f'{self.name}: config_json of kind {self.kind!r} '
                         f'lacks {missing}')

  def group(self, prefix: str) -> dict[str, np.ndarray]:
    """Entries under `prefix/`, with the prefix removed."""
    start = prefix.rstrip('/') + '/'
    return {k[len(start):]: v for k, v in self.arrays.items()
            if k.startswith(start)}

  def has_expected(self) -> bool:
    return any(k.startswith(EXPECTED + '/') or k.startswith(EXPECTED + '_')
               for k in self.arrays)

  @property
  def compute_dtype(self):
    name = self.config.get('compute_dtype', 'float32')
    if name not in ('float32', 'float64'):
      raise FixtureError(f'{self.name}: unknown compute_dtype {name!r}')
    return np.dtype(name)


def open_fixture(path: str | os.PathLike) -> Fixture:
  """Loads a fixture and parses its config; clear errors for bad files."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FixtureError(f'no fixture at {path}')
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except Exception as e:  # pylint: disable=broad-except
    raise FixtureError(f'{path}: not a readable .npz archive ({e})') from e
  if 'config_json' not in arrays:
    raise FixtureError(f'{path}: lacks the config_json entry that says its '
                       'kind')
  try:
    config = json.loads(str(arrays.pop('config_json')))
  except json.JSONDecodeError as e:
    raise FixtureError(f'{path}: config_json is not valid JSON ({e})') from e
  if 'kind' not in config:
    raise FixtureError(f'{path}: config_json lacks "kind"')
  return Fixture(path=path, arrays=arrays, config=config)


_RANET_DEFAULTS = {  # RANet-pytorch's args.py
    'nBlocks': 2, 'nChannels': 16, 'growthRate': 6, 'grFactor': '4-2-1',
    'bnFactor': '4-2-1', 'block_step': 2, 'compress_factor': 0.25,
    'step': 4, 'stepmode': 'even', 'bnAfter': True, 'reduction': 0.5,
}


def _stem_and_classes(config: Mapping[str, Any]) -> tuple[str, int]:
  """(stem, number of classes) from a config_json's "data" (and
  "num_classes"); FixtureError naming what is missing."""
  if 'data' not in config:
    raise FixtureError('config_json lacks "data" (cifar10, cifar100 or '
                       'ImageNet), which decides the stem and classifiers')
  data = str(config['data']).lower()
  num_classes = config.get('num_classes', _CLASSES_OF_DATA.get(data))
  if num_classes is None:
    raise FixtureError(f'config_json: unknown data {config["data"]!r} and no '
                       'num_classes')
  return ('cifar' if data.startswith('cifar') else 'imagenet',
          int(num_classes))


def ranet_config(config: Mapping[str, Any]) -> RANetConfig:
  """The original RANet's argument names (nBlocks, scale_list, bnAfter,
  ...) -> RANetConfig."""
  stem, num_classes = _stem_and_classes(config)
  if 'scale_list' not in config:
    raise FixtureError('config_json lacks "scale_list" (e.g. [1, 2, 3, 3])')
  c = {**_RANET_DEFAULTS, **config}
  return RANetConfig(
      n_blocks=int(c['nBlocks']), n_channels=int(c['nChannels']),
      growth_rate=int(c['growthRate']), gr_factor=c['grFactor'],
      bn_factor=c['bnFactor'], block_step=int(c['block_step']),
      scale_list=c['scale_list'],
      compress_factor=float(c['compress_factor']), step=int(c['step']),
      step_mode=str(c['stepmode']), bn_after=bool(c['bnAfter']),
      reduction=float(c['reduction']), stem=stem, num_classes=num_classes)


def fixture_model(config: Mapping[str, Any]):
  """The backbone a fixture's `config_json` describes (`model`: msdnet, the
  default, or ranet)."""
  model = str(config.get('model', 'msdnet')).lower()
  if model == 'ranet':
    return RANet(ranet_config(config))
  return MSDNet(msdnet_config(config))


def msdnet_config(config: Mapping[str, Any]) -> MSDNetConfig:
  """The original's argument names (nBlocks, stepmode, ...) -> MSDNetConfig."""
  model = str(config.get('model', 'msdnet')).lower()
  if model != 'msdnet':
    raise FixtureError(f'config_json: model {model!r} is not an MSDNet; this '
                       'fixture kind runs MSDNet fixtures only')
  stem, num_classes = _stem_and_classes(config)
  if 'stepmode' not in config:
    raise FixtureError('config_json lacks "stepmode" (even or lin_grow)')
  c = {**_ORIGINAL_DEFAULTS, **config}
  return MSDNetConfig(
      n_blocks=int(c['nBlocks']), n_channels=int(c['nChannels']),
      growth_rate=int(c['growthRate']), gr_factor=c['grFactor'],
      bn_factor=c['bnFactor'], step_mode=c['stepmode'], step=int(c['step']),
      base=int(c['base']), prune=c['prune'], bottleneck=bool(c['bottleneck']),
      reduction=float(c['reduction']), stem=stem, num_classes=int(num_classes))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


@dataclasses.dataclass
class Check:
  """One comparison: its error against its tolerance."""
  name: str
  error: float
  tolerance: float
  detail: str = ''

  @property
  def passed(self) -> bool:
    return bool(np.isfinite(self.error)) and self.error <= self.tolerance

  def as_json(self) -> dict[str, Any]:
    out = {'error': float(self.error), 'tolerance': self.tolerance,
           'passed': self.passed}
    if self.detail:
      out['detail'] = self.detail
    return out


@dataclasses.dataclass
class NotCompared:
  """An expected entry deliberately left unchecked, and why."""
  name: str
  reason: str


def max_abs_error(computed: Mapping[str, np.ndarray],
                  expected: Mapping[str, np.ndarray]) -> tuple[float, str]:
  """Largest |computed - expected| over shared keys; missing keys are inf."""
  worst, where = 0.0, ''
  for key, want in expected.items():
    if key not in computed:
      return float('inf'), f'{key} not computed'
    got = np.asarray(computed[key], dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
      return float('inf'), f'{key}: shape {got.shape} vs {want.shape}'
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    if not np.isfinite(err) or err > worst:
      worst, where = err, key
  return worst, where


def relative_norm_error(computed: Mapping[str, np.ndarray],
                        expected: Mapping[str, np.ndarray]) -> float:
  """||computed - expected|| / ||expected|| over all entries together."""
  num = den = 0.0
  for key, want in expected.items():
    if key not in computed or np.shape(computed[key]) != np.shape(want):
      return float('inf')
    want = np.asarray(want, np.float64)
    num += float(np.sum((np.asarray(computed[key], np.float64) - want)**2))
    den += float(np.sum(want**2))
  return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def relative_error(computed, expected) -> float:
  """max |c - e| / max(|e|, tiny) elementwise."""
  c = np.asarray(computed, np.float64)
  e = np.asarray(expected, np.float64)
  if c.shape != e.shape:
    return float('inf')
  return float(np.max(np.abs(c - e) / np.maximum(np.abs(e), 1e-300)))


def mismatch_count(computed, expected) -> float:
  """Number of entries that differ (for quantities that must be exact)."""
  c, e = np.asarray(computed), np.asarray(expected)
  if c.shape != e.shape:
    return float('inf')
  return float(np.sum(c != e))
