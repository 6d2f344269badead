"""The served model as StableHLO programs, for runtimes other than this
package (anything that loads `jax.export` artifacts or StableHLO).

Two programs, the variables and the exit rule compiled in, the thresholds an
input (one program serves every budget):

  batch.jax_export    images f32[b, H, W, C] (any b), thresholds f32[K]
                      -> labels i32[b], exits i32[b]. Every exit is
                      computed and each sample takes the first confident one
                      (budgeted evaluation's rule, on the device): the
                      predictions of early exiting without its saving.
  latency.jax_export  image f32[1, H, W, C], thresholds f32[K]
                      -> label i32[], exit i32[]. The real cascade of
                      nested conditionals (`SingleImageCascade`): later
                      blocks run only when needed. Absent for networks the
                      cascade cannot stage (IMTA).

Load one with `jax.export.deserialize(bytes)` and run it with `.call(...)`;
`.mlir_module()` gives its StableHLO text. They are lowered for the
platforms asked for (by default CPU, CUDA and TPU), which need not be
present when exporting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from l2w_jax import paths
from l2w_jax.evaluation import anytime, cascade

BATCH_FILE = 'batch.jax_export'
LATENCY_FILE = 'latency.jax_export'
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def first_confident_exit(confidence, prediction, thresholds):
  """Where each sample exits and what it predicts there.

  Args:
    confidence: (K, N) each exit's softmax maximum.
    prediction: (K, N) each exit's arg-max class.
    thresholds: (K,) the budget's thresholds (the last exit takes everyone).

  Returns:
    (labels (N,) int32, exits (N,) int32 0-based): the first exit whose
    confidence reaches its threshold, the last exit for everyone else (as
    `budgeted.exit_indices`).
  """
  reaches = confidence >= thresholds[:, None]
  reaches = reaches.at[-1].set(True)
  exits = jnp.argmax(reaches, axis=0).astype(jnp.int32)
  labels = jnp.take_along_axis(prediction, exits[None], axis=0)[0]
  return labels.astype(jnp.int32), exits


def _batch(model, variables, images, thresholds):
  stats = anytime.exit_statistics(model, variables, images,
                                  jnp.zeros((images.shape[0],), jnp.int32))
  return first_confident_exit(stats['confidence'], stats['prediction'],
                              thresholds)


def export_programs(model, variables, image_shape,
                    platforms=DEFAULT_PLATFORMS) -> dict:
  """The served programs of a model, as `jax.export.Exported`.

  Args:
    model: a multi-exit Flax module.
    variables: its variables, embedded in the programs as constants.
    image_shape: (H, W, C) of the normalised float32 images.
    platforms: the platforms the programs are lowered for.

  Returns:
    {'batch': (images (b, H, W, C), thresholds (K,)) -> (labels (b,),
    exits (b,)) with a symbolic batch b, every exit computed; 'latency':
    the same for one image (1, H, W, C) through the real cascade, present
    only if the model stages (`cascade.Cascade` accepts it)}.
  """
  num_exits = model.num_exits
  thresholds = jax.ShapeDtypeStruct((num_exits,), jnp.float32)
  batch, = jax.export.symbolic_shape('b')
  programs = {'batch': jax.export.export(
      jax.jit(functools.partial(_batch, model, variables)),
      platforms=tuple(platforms))(
          jax.ShapeDtypeStruct((batch,) + tuple(image_shape), jnp.float32),
          thresholds)}
  try:
    cascade._check_stageable(model)  # pylint: disable=protected-access
  except ValueError:
    return programs
  programs['latency'] = jax.export.export(
      jax.jit(functools.partial(cascade._exit_early, model, variables)),  # pylint: disable=protected-access
      platforms=tuple(platforms))(
          jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32),
          thresholds)
  return programs


def write_programs(directory: str, model, variables, image_shape,
                   platforms=DEFAULT_PLATFORMS) -> dict:
  """Writes `export_programs`' programs into `directory`.

  Args:
    directory: where to write (local or `gs://`).
    model, variables, image_shape, platforms: as `export_programs`.

  Returns:
    serving.json's description of them: {name: {'file': file name,
    'platforms': [platform, ...]}}.
  """
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  files = {'batch': BATCH_FILE, 'latency': LATENCY_FILE}
  written = {}
  for name, exported in export_programs(model, variables, image_shape,
                                        platforms).items():
    paths.write_bytes(paths.join(directory, files[name]),
                      exported.serialize())
    written[name] = {'file': files[name],
                     'platforms': list(exported.platforms)}
  return written


def load_program(path: str):
  """The `jax.export.Exported` in file `path` (local or gs://)."""
  return jax.export.deserialize(bytearray(paths.read_bytes(path)))

