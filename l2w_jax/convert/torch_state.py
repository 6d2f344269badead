"""PyTorch `state_dict` <-> Flax variables for the models of this project.

Module names here mirror the original's: the PyTorch path
``blocks.0.1.layers.2.conv_down.net.3.weight`` is the Flax path
``('blocks_0_1', 'layers_2', 'conv_down', 'net_3', 'kernel')`` (a list index
joins the name before it with '_'). Leaves are renamed and re-laid out:

| PyTorch                      | Flax                               |
| ---------------------------- | ---------------------------------- |
| conv `weight` (O, I, kh, kw) | params `kernel` (kh, kw, I, O)     |
| linear `weight` (O, I)       | params `kernel` (I, O)             |
| BN `weight` / `bias`         | params `scale` / `bias`            |
| `bias`                       | params `bias`                      |
| BN `running_mean` / `_var`   | batch_stats `mean` / `var`         |
| BN `num_batches_tracked`     | (not kept; given back on export)   |
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import flax
import jax
import numpy as np

_INDEX = re.compile(r'\.(\d+)')
_FLAX_INDEX = re.compile(r'_(\d+)')


class ConversionError(ValueError):
  """A state_dict that does not fit the model it is loaded into."""


def _flax_module_path(torch_module: str) -> tuple[str, ...]:
  if not torch_module:
    return ()
  return tuple(_INDEX.sub(r'_\1', torch_module).split('.'))


def _torch_module_path(flax_path: tuple[str, ...]) -> str:
  return '.'.join(_FLAX_INDEX.sub(r'.\1', name) for name in flax_path)


def torch_key_to_flax(name: str, value: np.ndarray):
  """One state_dict entry -> (collection, flax path, array) or None to drop."""
  module, _, leaf = name.rpartition('.')
  path = _flax_module_path(module)
  value = np.asarray(value)
  if leaf == 'num_batches_tracked':
    return None
  if leaf == 'weight':
    if value.ndim == 4:
      return 'params', path + ('kernel',), value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
      return 'params', path + ('kernel',), value.T
    if value.ndim == 1:
      return 'params', path + ('scale',), value
  if leaf == 'bias':
    return 'params', path + ('bias',), value
  if leaf == 'running_mean':
    return 'batch_stats', path + ('mean',), value
  if leaf == 'running_var':
    return 'batch_stats', path + ('var',), value
  raise ConversionError(f'cannot convert state_dict entry {name!r} with shape '
                        f'{value.shape}: unknown parameter kind')


def torch_to_flax(state_dict: Mapping[str, Any], template=None,
                  dtype=None) -> dict:
  """A PyTorch state_dict (name -> array) -> {'params': ..., 'batch_stats': ...}.

  With `template` (the model's own variables, e.g. from `model.init` or
  `jax.eval_shape`), every entry must exist there with the same shape and
  every template entry must be provided; otherwise a ConversionError lists
  what is missing, unexpected or of the wrong shape. `dtype` casts floats.
  """
  flat = {}
  for name, value in state_dict.items():
    converted = torch_key_to_flax(name, _to_numpy(value))
    if converted is None:
      continue
    collection, path, array = converted
    if dtype is not None and np.issubdtype(array.dtype, np.floating):
      array = array.astype(dtype)
    flat[(collection,) + path] = np.array(array, order='C')
  if template is not None:
    _check_against_template(flat, template)
  return flax.traverse_util.unflatten_dict(flat)


def _check_against_template(flat: dict, template) -> None:
  expected = {
      k: tuple(v.shape)
      for k, v in flax.traverse_util.flatten_dict(
          flax.core.unfreeze(template)).items()
  }
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  wrong = sorted(k for k in set(flat) & set(expected)
                 if tuple(flat[k].shape) != expected[k])
  if missing or unexpected or wrong:
    lines = []
    for title, keys in (('missing', missing), ('unexpected', unexpected)):
      if keys:
        names = [_describe(k) for k in keys[:10]]
        more = f' (+{len(keys) - 10} more)' if len(keys) > 10 else ''
        lines.append(f'{title}: {", ".join(names)}{more}')
    for k in wrong[:10]:
      lines.append(f'shape of {_describe(k)}: checkpoint '
                   f'{tuple(flat[k].shape)} (Flax layout) vs model '
                   f'{expected[k]}')
    raise ConversionError(
        'the state_dict does not match the model configuration; check that '
        'the config (n_blocks, step, base, growth_rate, gr_factor, ...) is '
        'the one the checkpoint was trained with.\n  ' + '\n  '.join(lines))


def _describe(key: tuple[str, ...]) -> str:
  collection, *path = key
  return f'{_torch_module_path(tuple(path[:-1]))} [{collection}/{path[-1]}]'


def flax_to_torch(variables: Mapping[str, Any],
                  num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """{'params': ..., 'batch_stats': ...} -> PyTorch state_dict of numpy arrays.

  BatchNorm layers get `num_batches_tracked` (int64), which Flax does not
  keep: pass the number of train-mode forward passes if it matters.
  """
  out = {}
  params = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(variables.get('params', {})))
  stats = flax.traverse_util.flatten_dict(
      flax.core.unfreeze(variables.get('batch_stats', {})))
  for path, value in params.items():
    module = _torch_module_path(path[:-1])
    value = np.asarray(value)
    leaf = path[-1]
    if leaf == 'kernel' and value.ndim == 4:
      out[f'{module}.weight'] = value.transpose(3, 2, 0, 1)
    elif leaf == 'kernel' and value.ndim == 2:
      out[f'{module}.weight'] = value.T
    elif leaf == 'scale':
      out[f'{module}.weight'] = value
    elif leaf == 'bias':
      out[f'{module}.bias'] = value
    else:
      raise ConversionError(f'no PyTorch name for Flax parameter {path}')
  for path, value in stats.items():
    module = _torch_module_path(path[:-1])
    name = {'mean': 'running_mean', 'var': 'running_var'}[path[-1]]
    out[f'{module}.{name}'] = np.asarray(value)
    out[f'{module}.num_batches_tracked'] = np.asarray(num_batches_tracked,
                                                      dtype=np.int64)
  return {k: np.array(v, order='C') for k, v in out.items()}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor
    return value.detach().cpu().numpy()
  return np.asarray(value)


def _strip_module_prefix(state: Mapping[str, Any]) -> dict:
  """Drops DistributedDataParallel's 'module.' prefix."""
  if state and all(k.startswith('module.') for k in state):
    return {k[len('module.'):]: v for k, v in state.items()}
  return dict(state)


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, dict]:
  """Reads a `.pth` / `.pth.tar` (needs PyTorch) or a `.npz` checkpoint.

  Returns {'model': state_dict, 'meta_net': state_dict (if present)} of
  numpy arrays. Understands the original's checkpoints (`state_dict`,
  `meta_state_dict`), bare state_dicts, DDP 'module.' prefixes, and `.npz`
  files with `model/...` and `meta_net/...` entries.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no checkpoint at {path}')
  if path.endswith('.npz'):
    try:
      # allow_pickle=False: an archive that holds pickled objects is refused
      # rather than executed.
      with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(
          f'cannot read {path} as an .npz of arrays ({type(e).__name__}: '
          f'{e}); pickled entries are refused, save plain arrays') from e
    out = {}
    for prefix in ('model', 'meta_net'):
      sub = {k[len(prefix) + 1:]: v for k, v in arrays.items()
             if k.startswith(prefix + '/')}
      if sub:
        out[prefix] = sub
    if not out:
      out['model'] = arrays
    return out
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'reading {path} needs PyTorch (pip install torch); or convert it to '
        '.npz where PyTorch is installed') from e
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'cannot read {path} as a PyTorch checkpoint: '
                          f'{e}') from e
  out = {}
  if isinstance(checkpoint, Mapping) and 'state_dict' in checkpoint:
    out['model'] = checkpoint['state_dict']
    if 'meta_state_dict' in checkpoint:
      out['meta_net'] = checkpoint['meta_state_dict']
  elif isinstance(checkpoint, Mapping) and 'model' in checkpoint:
    out['model'] = checkpoint['model']
  elif isinstance(checkpoint, Mapping):
    out['model'] = checkpoint
  else:
    raise ConversionError(f'{path} holds a {type(checkpoint).__name__}, not a '
                          'state_dict')
  return {k: {n: _to_numpy(t) for n, t in _strip_module_prefix(v).items()}
          for k, v in out.items()}


def variables_template(model, example_input, **kwargs):
  """Shapes of a model's variables without computing anything."""
  return jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, **kwargs), example_input)
