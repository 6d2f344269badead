"""The served-model artifact: one directory with everything prediction needs.

  variables.msgpack  {'params', 'batch_stats'} (flax.serialization msgpack of
                     the numpy state dict)
  config.json        the run's config (`config.to_json()`)
  serving.json       format version, method, input (image shape, mean, std),
                     cumulative MFLOPs per exit, params_sha256 and the 39
                     budgets of the run's results.json (thresholds, expected
                     MFLOPs, held-out and test top-1, test exit counts)

`write_artifact` writes it atomically (a temporary directory renamed into
place) and only replaces an existing artifact when asked. The directory may
be local or a gs:// URL (`l2w_jax.paths`). `read_artifact`
checks it (files present, format version, msgpack readable, parameters
matching params_sha256 and the config's model) and returns its parts.
Reading a local artifact never imports TensorFlow (a gs:// one is read
through TensorFlow's GCS filesystem); writing reads the dataset's
normalisation from `l2w_jax.data`, which imports it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from l2w_jax import paths
from l2w_jax.convert import torch_state
from l2w_jax.evaluation.fingerprint import params_sha256
from l2w_jax.evaluation.flops import count_per_exit
from l2w_jax.training.learner import method_model

FORMAT_VERSION = 1
VARIABLES_FILE = 'variables.msgpack'
CONFIG_FILE = 'config.json'
SERVING_FILE = 'serving.json'
ARTIFACT_FILES = (VARIABLES_FILE, CONFIG_FILE, SERVING_FILE)
COLLECTIONS = ('params', 'batch_stats')
EXPORT_HINT = ('python -m experiments.export --config=<config> '
               '--workdir=<run> --out=<dir>')
BUDGET_FIELDS = ('budget_index', 'thresholds', 'mflops', 'val_top1',
                 'test_top1', 'test_exit_counts')


@dataclasses.dataclass(frozen=True)
class Artifact:
  """A read artifact: the config, numpy variables and serving.json's dict."""
  config: ml_collections.ConfigDict
  variables: dict
  serving: dict


def numpy_variables(variables) -> dict:
  """{'params', 'batch_stats'} of any arrays -> nested dicts of numpy."""
  return {c: jax.tree_util.tree_map(np.asarray, jax.device_get(
      flax.core.unfreeze(variables[c]))) for c in COLLECTIONS}


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 (..., C) -> float32 (..., C): x / 255, then (x - mean) / std, in
  float32 and in that order, as `l2w_jax.data.augment.to_float_normalized`.
  Bit for bit what it gives eagerly and in the tf.data pipelines (measured
  on every grey level with the digits, CIFAR and ImageNet constants, and on
  the digits test set); inside a `tf.function`, TensorFlow's graph rewrites
  round some values differently."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'normalize takes uint8 images (0..255), got '
                     f'{images.dtype}; pass images that are already '
                     'normalised straight to the predictor')
  x = images.astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _tuples(value):
  """JSON lists back to the tuples the configs hold (model fields such as
  gr_factor must be hashable)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """`config.to_json()` text -> a ConfigDict with tuples for lists."""
  return ml_collections.ConfigDict(_tuples(json.loads(text)))


def variable_shapes(model, image_shape) -> dict:
  """{path: shape} of the variables `model.init` makes (nothing computed)."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  template = torch_state.variables_template(model, x, train=False)
  return _shapes({c: template[c] for c in COLLECTIONS if c in template})


def _shapes(variables) -> dict:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)))
  return {'/'.join(path): tuple(np.shape(a)) for path, a in flat.items()}


def check_variables(model, variables, image_shape, where: str) -> None:
  """ValueError naming the first difference unless `variables` have the
  paths and shapes of `model`'s on `image_shape` images."""
  want, got = variable_shapes(model, image_shape), _shapes(variables)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  wrong = sorted(p for p in set(want) & set(got) if want[p] != got[p])
  if missing or extra or wrong:
    detail = (f'missing {missing[0]}' if missing else
              f'unexpected {extra[0]}' if extra else
              f'{wrong[0]} has shape {got[wrong[0]]}, the model needs '
              f'{want[wrong[0]]}')
    raise ValueError(f'{where}: the variables do not fit the config\'s model '
                     f'({detail}); export with the run\'s own --config')


def budget_rows(results: dict, num_exits: int) -> list[dict]:
  """The 39 rows of results['budgeted'] with the fields serving needs;
  ValueError if they are absent or malformed."""
  rows = results.get('budgeted')
  if not rows:
    raise ValueError('results have no budgeted rows: evaluate the run first '
                     '(python -m experiments.evaluate)')
  out = []
  for i, row in enumerate(rows):
    missing = [f for f in BUDGET_FIELDS if f not in row]
    if missing:
      raise ValueError(f'budgeted row {i} lacks {missing}: re-evaluate the '
                       'run with python -m experiments.evaluate')
    if row['budget_index'] != i + 1:
      raise ValueError(f'budgeted row {i} has budget_index '
                       f'{row["budget_index"]}, expected {i + 1}')
    if (len(row['thresholds']) != num_exits or
        len(row['test_exit_counts']) != num_exits):
      raise ValueError(f'budget {i + 1} has {len(row["thresholds"])} '
                       f'thresholds for a model with {num_exits} exits: the '
                       '--config is not the run\'s')
    out.append({f: row[f] for f in BUDGET_FIELDS})
  return out


def _check_results_match(results: dict, config, model, variables,
                         image_shape, digest: str) -> None:
  """ValueError unless results.json belongs to these variables and model."""
  if results.get('method', config.method) != config.method:
    raise ValueError(f'results are of method {results["method"]!r}, the '
                     f'config trains {config.method!r}: export with the '
                     'run\'s own --config')
  if results.get('params_sha256') != digest:
    raise ValueError(f'results were evaluated on other parameters '
                     f'(params_sha256 {results.get("params_sha256")}) than '
                     f'the checkpoint\'s ({digest}): re-evaluate the run '
                     '(python -m experiments.evaluate) before exporting')
  mflops = np.asarray(results.get('mflops_per_exit', ()), np.float64)
  counted = np.asarray(count_per_exit(model, image_shape)[0]) / 1e6
  if mflops.shape != counted.shape or not np.allclose(mflops, counted,
                                                      rtol=1e-9):
    raise ValueError(f'results\' mflops_per_exit {mflops.tolist()} differ '
                     f'from the model\'s {counted.tolist()}: the --config is '
                     'not the run\'s')
  check_variables(model, variables, image_shape, 'export')


def serving_spec(config, model, variables, results: dict) -> dict:
  """serving.json's content for a run: what prediction needs besides the
  variables and config. Reads the normalisation from the dataset settings
  (imports `l2w_jax.data`, hence TensorFlow)."""
  from l2w_jax import data  # pylint: disable=g-import-not-at-top
  settings = data.input_spec(config)
  digest = params_sha256(variables['params'], variables['batch_stats'])
  _check_results_match(results, config, model, variables,
                       settings.image_shape, digest)
  return {
      'format_version': FORMAT_VERSION,
      'method': config.method,
      'dataset': settings.name,
      'num_classes': int(config.dataset.num_classes),
      'num_exits': int(model.num_exits),
      'image_shape': list(settings.image_shape),
      'mean': list(settings.mean),
      'std': list(settings.std),
      'eval_transform': settings.eval_transform,
      # Cumulative: a sample leaving at exit k costs mflops_per_exit[k].
      'mflops_per_exit': [float(m) for m in results['mflops_per_exit']],
      'params_sha256': digest,
      'iterations': results.get('iterations'),
      'threshold_source': results.get('threshold_source'),
      'num_test': results.get('num_test'),
      'budgets': budget_rows(results, model.num_exits),
  }


def is_artifact(path: str) -> bool:
  """Whether `path` is a directory holding a serving.json."""
  return paths.is_file(paths.join(path, SERVING_FILE))


def check_replaceable(path: str, overwrite: bool) -> None:
  """FileExistsError unless `path` is free, or `overwrite` and it holds an
  artifact (or nothing): other files are never replaced. ValueError for a
  path on a filesystem this code cannot write (`paths.check_writable`)."""
  paths.check_writable(path, 'cannot write the artifact to')
  if not paths.lexists(path):
    return
  if not overwrite:
    raise FileExistsError(f'{path} already exists: pass overwrite=True '
                          '(--overwrite) to replace it, or choose another '
                          'output path')
  if not (is_artifact(path) or (paths.is_dir(path) and
                                not paths.listdir(path))):
    raise FileExistsError(f'{path} exists and is not a serving artifact; '
                          'refusing to replace it: choose another output '
                          'path')


def write_artifact(path: str, config, variables, results: dict, *,
                   overwrite: bool = False, programs: bool = False,
                   platforms=('cpu', 'cuda', 'tpu')) -> str:
  """Writes the artifact of a run to the directory `path`.

  Args:
    path: the artifact directory, local or `gs://` (its parent is created
      if needed).
    config: the run's ConfigDict.
    variables: {'params', 'batch_stats'} (e.g. `workdir.restore_variables`).
    results: the run's results.json dict (`budgeted`, `mflops_per_exit`,
      `params_sha256`, ...), which must have been evaluated on `variables`.
    overwrite: replace an existing artifact at `path`.
    programs: also write the StableHLO programs (`serving.stablehlo`),
      lowered for `platforms`, and list them in serving.json.
    platforms: the platforms they are lowered for.

  Returns:
    the absolute path written.

  Everything is written to a temporary directory next to `path` and renamed
  into place, so `path` is either absent, the old artifact or the complete
  new one (on GCS, where a directory is renamed object by object, a reader
  may see it partly moved: is_artifact holds only once serving.json, moved
  last, is there).
  """
  path = paths.absolute(path)
  check_replaceable(path, overwrite)
  variables = numpy_variables(variables)
  model = method_model(config)
  spec = serving_spec(config, model, variables, results)
  parent, name = paths.split(path)
  staging = paths.make_temp_dir(parent, prefix=f'.{name}.', suffix='.tmp')
  arrays = flax.serialization.msgpack_serialize(
      flax.serialization.to_state_dict(variables))
  try:
    paths.write_bytes(paths.join(staging, VARIABLES_FILE), arrays)
    paths.write_bytes(paths.join(staging, CONFIG_FILE),
                      config.to_json().encode())
    if programs:
      from l2w_jax.serving import stablehlo  # pylint: disable=g-import-not-at-top
      spec['programs'] = stablehlo.write_programs(
          staging, model, variables, spec['image_shape'], platforms)
    paths.write_bytes(paths.join(staging, SERVING_FILE),
                      json.dumps(spec, indent=1).encode())
    _move_into_place(staging, path, overwrite)
  except BaseException as e:
    _remove_quietly(staging)
    if isinstance(e, paths.NoSpaceError):  # the artifact's size, not a file's
      other = 0 if e.path.endswith(VARIABLES_FILE) else e.needed
      raise paths.NoSpaceError(path, len(arrays) + other, e.why) from e
    raise
  return path


def _remove_quietly(path: str) -> None:
  """Deletes the directory `path`, ignoring errors (a cleanup after another
  error, or of a replaced artifact)."""
  try:
    paths.rmtree(path)
  except OSError:
    pass


def _move_into_place(staging: str, path: str, overwrite: bool) -> None:
  """Renames `staging` to `path`; an old artifact there is moved aside first
  and deleted once the new one is in place (put back if the rename fails)."""
  check_replaceable(path, overwrite)  # again: something may have appeared
  if not paths.lexists(path):
    paths.rename(staging, path)
    return
  aside = staging + '.old'
  paths.rename(path, aside)
  try:
    paths.rename(staging, path)
  except BaseException:
    paths.rename(aside, path)
    raise
  _remove_quietly(aside)


def artifact_size(path: str) -> int:
  """Bytes of the artifact's files (the programs included)."""
  return sum(paths.getsize(paths.join(path, f)) for f in paths.listdir(path))


def _read_json(path: str, file: str):
  try:
    return json.loads(paths.read_text(paths.join(path, file)))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'{paths.join(path, file)} is not valid JSON ({e}): '
                     f'the artifact is damaged; re-export it with '
                     f'{EXPORT_HINT}') from e


def _read_variables(path: str, digest: str) -> dict:
  """The numpy variables of variables.msgpack, checked against `digest`."""
  file = paths.join(path, VARIABLES_FILE)
  content = paths.read_bytes(file)
  try:
    state = flax.serialization.msgpack_restore(content)
  except Exception as e:  # msgpack raises several unrelated types
    raise ValueError(f'{file} is not a readable msgpack file '
                     f'({type(e).__name__}: {e}): the artifact is damaged; '
                     f're-export it with {EXPORT_HINT}') from e
  if not isinstance(state, dict) or set(state) != set(COLLECTIONS):
    raise ValueError(f'{file} does not hold {{"params", "batch_stats"}}: '
                     f'the artifact is damaged; re-export it with '
                     f'{EXPORT_HINT}')
  if params_sha256(state['params'], state['batch_stats']) != digest:
    raise ValueError(f'{file} does not match the artifact\'s params_sha256 '
                     f'{digest}: the file was changed or damaged; re-export '
                     f'it with {EXPORT_HINT}')
  return state


def read_artifact(path: str) -> Artifact:
  """Reads and checks an artifact (no model is built, and nothing imports
  TensorFlow).

  Args:
    path: an artifact directory, local or `gs://`.

  Returns:
    `Artifact(config, variables {'params', 'batch_stats'} as numpy,
    serving: serving.json's dict)`.

  Raises:
    FileNotFoundError, ValueError: naming the problem and the fix (no
      artifact, a missing file, another format version, variables whose
      hash is not the recorded one).
  """
  path = os.fspath(path)
  if not paths.is_dir(path):
    raise FileNotFoundError(f'no serving artifact at {path}: export one with '
                            f'{EXPORT_HINT}')
  missing = [f for f in ARTIFACT_FILES
             if not paths.is_file(paths.join(path, f))]
  if missing:
    raise FileNotFoundError(f'{path} is not a complete serving artifact '
                            f'(missing {", ".join(missing)}): re-export it '
                            f'with {EXPORT_HINT}')
  serving = _read_json(path, SERVING_FILE)
  version = serving.get('format_version') if isinstance(serving, dict) else None
  if version != FORMAT_VERSION:
    raise ValueError(f'{path} has artifact format version {version}, this '
                     f'code reads version {FORMAT_VERSION}: re-export it with '
                     f'{EXPORT_HINT}')
  text = paths.read_text(paths.join(path, CONFIG_FILE))
  try:
    config = config_from_json(text)
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f'{paths.join(path, CONFIG_FILE)} is not a config '
                     f'({e}): re-export the artifact with {EXPORT_HINT}') from e
  variables = _read_variables(path, serving['params_sha256'])
  return Artifact(config=config, variables=variables, serving=serving)
