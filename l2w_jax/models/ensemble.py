"""BoostNet's test-time prediction (Yu et al., AAAI 2023; `DynamicNet.forward`
of the original): exit k predicts with the ensemble of exits 0..k,

  Q_0 = o_0,  Q_k = o_k + Q_{k-1} * r_k   (0-based, r_k the k-th reweight).
"""

from __future__ import annotations

from typing import Sequence

import jax


def ensemble_logits(exit_logits: Sequence[jax.Array],
                    reweight: Sequence[float]) -> list[jax.Array]:
  """K x (B, C) exit logits o_k -> K x (B, C) ensemble logits Q_k."""
  out = []
  for k, (logits, r) in enumerate(zip(exit_logits, reweight, strict=True)):
    out.append(logits if k == 0 else logits + out[-1] * r)
  return out
