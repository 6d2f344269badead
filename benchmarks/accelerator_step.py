r"""Training-step throughput on whatever devices this host has.

  python -m benchmarks.accelerator_step --batch_size=128

For each config (the CIFAR-100 and the ImageNet MSDNet by default) and each
compute dtype (float32, bfloat16), times the training loop's own iteration
(`training.step.make_iteration`: one program per iteration, data parallel
over every device, the batch crossing the host-device link as uint8 and
normalised on the device) of the plain multi-exit method (uniform weights)
and of L2W-DEN with a meta step on both halves, at `--batch_size` images per
device. Prints one JSON line per (config, dtype): images per second, median
step seconds over `--iterations` timed iterations, and the seconds spent
compiling each program (JAX's backend-compile events; the persistent cache
is off, so this is real compilation).

Needs only jax, flax, optax, numpy and ml_collections: no TensorFlow, no
dataset (the images are random uint8), so it runs on a bare TPU VM or GPU
node right after `pip install -e '.[tpu]'` (or `.[cuda]`). Expect well
under 5 minutes on an accelerator; on a CPU use a tiny batch and the
`--override`s of the test (tests/test_accelerator_step.py).
"""

import ast
import importlib
import json
import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from configs import common
from l2w_jax import compilation
from l2w_jax import parallel
from l2w_jax.training import step as step_lib
from l2w_jax.training.learner import build_learner, init_train_state

_CONFIGS = flags.DEFINE_list(
    'configs', ['configs/cifar100.py', 'configs/imagenet.py'],
    'Config files whose model is timed.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'],
                            'train.compute_dtype values timed.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per device.')
_ITERS = flags.DEFINE_integer('iterations', 5, 'Timed iterations per kind.')
_OVERRIDES = flags.DEFINE_multi_string(
    'override', [], 'field=value applied to every config, e.g. '
    '--override=model.n_blocks=2 (the value a Python literal); repeatable.')

# Timing only: any per-channel constants serve (ImageNet's).
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_config(path: str, overrides, dtype: str):
  """The config of the file `path` with `overrides` and `dtype` set."""
  module = importlib.import_module(path.removesuffix('.py').replace('/', '.'))
  config = module.get_config()
  for item in overrides:
    name, _, text = item.partition('=')
    node = config
    *parents, field = name.split('.')
    for parent in parents:
      node = node[parent]
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    setattr(node, field, value)
  config.train.compute_dtype = dtype
  return config


def _image_size(config) -> int:
  size = config.dataset.get('image_size', None)
  return int(size) if size else 32


def time_config(path: str, dtype: str) -> dict:
  """The figures of one (config, dtype): see the module docstring."""
  config = load_config(path, _OVERRIDES.value, dtype)
  learner = build_learner(config)
  mesh = parallel.make_mesh()
  devices = mesh.devices.size
  size = _image_size(config)
  global_batch = _BATCH.value * devices
  rng = np.random.default_rng(0)
  local = global_batch // jax.process_count()
  images = rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, config.dataset.num_classes, (local,),
                        dtype=np.int32)
  out = {'config': path, 'dtype': dtype, 'devices': devices,
         'device_kind': mesh.devices.flat[0].device_kind,
         'platform': mesh.devices.flat[0].platform,
         'per_device_batch': _BATCH.value, 'global_batch': global_batch,
         'image_size': size}
  for method, with_meta in (('uniform', False), ('l2w', True)):
    name = 'plain' if method == 'uniform' else 'l2w'
    iteration = step_lib.make_iteration(method, learner, mesh,
                                        input_norm=(_MEAN, _STD))
    state = jax.device_put(
        init_train_state(learner, jax.random.PRNGKey(0), (size, size, 3)),
        parallel.replicated(mesh))
    batch = [parallel.global_array(a, mesh) for a in (images, labels)]
    with compilation.CompileLog() as log:
      start = time.perf_counter()
      state, _ = iteration(state, *batch, 0.1, 1e-4, with_meta)
      jax.block_until_ready(state)
      first = time.perf_counter() - start
    times = []
    for _ in range(_ITERS.value):
      batch = [parallel.global_array(a, mesh) for a in (images, labels)]
      start = time.perf_counter()
      state, _ = iteration(state, *batch, 0.1, 1e-4, with_meta)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - start)
    # The throughput from the step time as printed, so that the two agree.
    step_s = round(statistics.median(times), 5)
    out[f'{name}_step_s'] = step_s
    out[f'{name}_images_per_second'] = round(global_batch / step_s, 1)
    out[f'{name}_compile_s'] = round(log.seconds, 2)
    out[f'{name}_first_call_s'] = round(first, 2)
  out['images_per_second'] = out['l2w_images_per_second']
  out['l2w_over_plain'] = round(out['l2w_step_s'] / out['plain_step_s'], 3)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  compilation.enable_cache('none')  # compile times are the real ones
  # A multi-host TPU slice: every host runs this; process 0 prints.
  parallel.initialize_distributed(common.base_config())
  for path in _CONFIGS.value:
    for dtype in _DTYPES.value:
      figures = time_config(path, dtype)
      if jax.process_index() == 0:
        print(json.dumps(figures), flush=True)


if __name__ == '__main__':
  app.run(main)
