"""BoostNet's test-time prediction (Yu et al., AAAI 2023; `DynamicNet.forward`
of the original): exit k predicts with the ensemble of exits 0..k,

  Q_0 = o_0,  Q_k = o_k + Q_{k-1} * r_k   (0-based, r_k the k-th reweight).
"""

from __future__ import annotations

from typing import Sequence

import jax


def ensemble_step(logits: jax.Array, previous: jax.Array | None, k: int,
                  reweight: Sequence[float]) -> jax.Array:
  """Q_k from exit k's logits o_k (B, C) and Q_{k-1} (None at k = 0)."""
  return logits if k == 0 else logits + previous * reweight[k]


def ensemble_logits(exit_logits: Sequence[jax.Array],
                    reweight: Sequence[float]) -> list[jax.Array]:
  """K x (B, C) exit logits o_k -> K x (B, C) ensemble logits Q_k."""
  if len(exit_logits) != len(reweight):
    raise ValueError(f'{len(exit_logits)} exits but {len(reweight)} '
                     'reweights')
  out = []
  for k, logits in enumerate(exit_logits):
    out.append(ensemble_step(logits, out[-1] if out else None, k, reweight))
  return out
