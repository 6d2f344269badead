"""A digest that identifies trained variables (results.json, artifacts)."""

from __future__ import annotations

import hashlib

import flax
import numpy as np


def params_sha256(params, batch_stats) -> str:
  """SHA-256 over all parameters and batch statistics in sorted-path order
  (path, dtype, shape and bytes of each array)."""
  digest = hashlib.sha256()
  for collection, tree in (('params', params), ('batch_stats', batch_stats)):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    for path in sorted(flat):
      array = np.ascontiguousarray(np.asarray(flat[path]))
      digest.update('/'.join((collection,) + tuple(path)).encode())
      digest.update(f'{array.dtype}{array.shape}'.encode())
      digest.update(array.tobytes())
  return digest.hexdigest()
