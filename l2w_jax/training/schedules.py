"""Learning-rate schedules, evaluated on the host in float64 like the original."""

import math


def cosine_learning_rate(base: float, iteration: int, total: int) -> float:
  """lr0 * (1 + cos(pi * t / T)) / 2, t counting iterations from 0.

  The original (`adjust_learning_rate` with --lr-type cosine) sets this on
  every iteration, for the backbone and (with its own lr0) the weight net.
  """
  if total <= 0:
    raise ValueError(f'the schedule needs a positive number of iterations, '
                     f'got {total}')
  return 0.5 * base * (1.0 + math.cos(math.pi * iteration / total))
