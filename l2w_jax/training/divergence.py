"""A diverged run stops with one line that says what became non-finite,
where, and what is on disk; nothing non-finite is ever saved."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax.training.checkpoint import Checkpointer
from l2w_jax.training.state import TrainState


class TrainingDiverged(FloatingPointError):
  """The loss became NaN or infinite."""


def diverged(what: str, step: int, checkpointer: Checkpointer):
  """The TrainingDiverged error for `what` going non-finite at iteration
  `step`, saying truthfully what is on disk and what a rerun does."""
  last = checkpointer.latest_step()
  if last is None:
    disk = ('no checkpoint has been written, so rerunning the same command '
            'starts from scratch and meets the same divergence')
  else:
    disk = (f'nothing non-finite was saved: the newest checkpoint (iteration '
            f'{last}) is untouched, and rerunning the same command resumes '
            'from it and meets the same divergence')
  return TrainingDiverged(
      f'{what} at iteration {step}: training stopped; {disk}. Lower train.lr '
      'or meta.lr (or check the input data), then run in a new --workdir or '
      'with --overwrite (which moves this run aside).')


def first_non_finite(fetched: list, first_step: int):
  """(iteration, quantity, value) of the first non-finite loss, meta loss or
  exit weight in a window of fetched per-iteration metrics whose first
  iteration is `first_step` (1-based, as logged); None if all are finite."""
  for offset, iteration in enumerate(fetched):
    for half in iteration['halves']:
      # The most specific first: an exit's loss makes the total non-finite.
      quantities = [(f"exit {k + 1}'s loss", v)
                    for k, v in enumerate(np.ravel(half['loss_per_exit']))]
      if 'meta_loss' in half:
        quantities.append(('the meta loss', half['meta_loss']))
      quantities += [(f"exit {k + 1}'s mean weight", v)
                     for k, v in enumerate(np.ravel(half['weight_per_exit']))]
      quantities.append(('the training loss', half['train_loss']))
      for name, value in quantities:
        if not np.isfinite(value):
          return first_step + offset, name, float(value)
  return None


def check_finite(fetched: list, first_step: int,
                  checkpointer: Checkpointer) -> None:
  """Raises TrainingDiverged naming the first non-finite quantity."""
  bad = first_non_finite(fetched, first_step)
  if bad is not None:
    step, name, value = bad
    raise diverged(f'{name} became {value}', step, checkpointer)


def is_float(leaf) -> bool:
  """Whether `leaf` can hold a NaN or Inf (integers and keys cannot)."""
  dtype = leaf.dtype if hasattr(leaf, 'dtype') else np.result_type(leaf)
  return jnp.issubdtype(dtype, jnp.inexact)


def non_finite_leaf(tree) -> str | None:
  """The path of the first leaf of `tree` holding a NaN or Inf, or None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if is_float(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
      return jax.tree_util.keystr(path)
  return None


@jax.jit
def all_finite(leaves: list) -> jax.Array:
  """One boolean on the device: whether every float leaf is finite (the
  state is reduced where it lives; only this scalar is fetched)."""
  flags = [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def check_state_finite(state: TrainState, step: int,
                        checkpointer: Checkpointer) -> None:
  """Raises TrainingDiverged instead of letting a NaN/Inf state be saved.

  Checks on the device and fetches one scalar; only a non-finite state is
  copied to the host, to name its first bad leaf."""
  leaves = [x for x in jax.tree_util.tree_leaves(state) if is_float(x)]
  if bool(all_finite(leaves)):
    return
  leaf = non_finite_leaf(jax.device_get(state))
  raise diverged(f'the training state became non-finite (first: {leaf})',
                  step, checkpointer)
