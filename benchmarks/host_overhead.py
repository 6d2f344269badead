r"""Host time the training loop spends per iteration outside the device.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m benchmarks.host_overhead --global_batch=512

At ImageNet shapes (224x224x3 uint8 images, `--global_batch` of them over
every device), runs the training loop's host path, `parallel.
prefetch_to_mesh` feeding `step.make_iteration`, with a trivial device step
(a registered method whose half step reads one pixel and the labels, so the
device finishes at once and XLA drops the normalisation of the rest). The
batches come from memory (no input pipeline). `host_ms_per_iteration` is
the median, over `--iterations`, of the time the host thread spends in the
loop per iteration: taking the next batch from the prefetcher (which hands
each device its rows and starts the transfer two batches ahead) and
dispatching the iteration's one program. The host batches are in 64-byte
aligned buffers, as tf.data's numpy batches are: on CPU devices JAX then
places each device's rows without copying them (on an accelerator the
transfer is a DMA that runs while the host goes on).

For comparison, `previous_host_ms_per_iteration` times the path this
replaced, on the same batches in the same run: float32 images (what the
pipeline emitted), every batch reordered on the host into the devices'
halves (a copy of the batch), four arrays placed, two programs dispatched.
Prints one JSON line.
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from l2w_jax import parallel
from l2w_jax.training import registry
from l2w_jax.training import step as step_lib
from l2w_jax.training.state import Learner, TrainState

_BATCH = flags.DEFINE_integer('global_batch', 512, 'Images per iteration.')
_SIZE = flags.DEFINE_integer('image_size', 224, 'Image side.')
_ITERS = flags.DEFINE_integer('iterations', 30, 'Timed iterations.')

_NUM_EXITS = 5


def _trivial_half_step(learner, state, train_images, train_labels,
                       meta_images, meta_labels, learning_rate,
                       meta_learning_rate, with_meta):
  """A half step that does next to nothing on the device."""
  del learner, meta_images, meta_labels, meta_learning_rate, with_meta
  pixel = train_images[0, 0, 0, 0].astype(jnp.float32)
  loss = pixel + jnp.mean(train_labels.astype(jnp.float32)) * learning_rate
  per_exit = jnp.full((_NUM_EXITS,), loss)
  return state, {'train_loss': loss, 'loss_per_exit': per_exit,
                 'weight_per_exit': per_exit,
                 'correct': jnp.zeros((_NUM_EXITS,), jnp.int32)}


registry.register('host_overhead_trivial', _trivial_half_step)


def _state():
  zero = jnp.zeros((), jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params={'w': zero},
                    batch_stats={}, opt_state=())


class _NoRemat:
  """Stands in for the model where only `cfg.remat` is read."""

  class cfg:  # pylint: disable=invalid-name
    remat = False


def _learner():
  return Learner(model=_NoRemat(), tx=None)


def _batches(pool, count):
  for i in range(count):
    yield pool[i % len(pool)]


def _time_current(mesh, pool, iterations):
  iteration = step_lib.make_iteration(
      'host_overhead_trivial', _learner(), mesh,
      input_norm=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
  state = jax.device_put(_state(), parallel.replicated(mesh))
  feed = parallel.prefetch_to_mesh(_batches(pool, iterations + 3), mesh)
  batch = next(feed)  # compiles
  state, _ = iteration(state, batch['image'], batch['label'], 0.1, 0.0,
                       False)
  jax.block_until_ready(state)
  host = []
  start_all = time.perf_counter()
  for _ in range(iterations):
    start = time.perf_counter()
    batch = next(feed)
    state, metrics = iteration(state, batch['image'], batch['label'], 0.1,
                               0.0, False)
    host.append(time.perf_counter() - start)
  jax.block_until_ready((state, metrics))
  wall = (time.perf_counter() - start_all) / iterations
  return statistics.median(host), wall


def _device_halves(images, labels, num_local):
  """The removed host-side reorder: each device's rows split in halves."""
  b = images.shape[0] // num_local
  first = -(-b // 2)

  def split(x):
    x = x.reshape((num_local, b) + x.shape[1:])
    return (x[:, :first].reshape((-1,) + x.shape[2:]),
            x[:, first:].reshape((-1,) + x.shape[2:]))

  (x1, x2), (y1, y2) = split(images), split(labels)
  return (x1, y1), (x2, y2)


def _time_previous(mesh, pool, iterations):
  learner = step_lib.data_parallel_learner(_learner())
  half = step_lib.sharded_half_step(_trivial_half_step, learner, mesh)
  num_local = parallel.local_device_count(mesh)
  state = jax.device_put(_state(), parallel.replicated(mesh))

  def iteration(state, images, labels):
    (x1, y1), (x2, y2) = _device_halves(images, labels, num_local)
    x1, y1, x2, y2 = [parallel.global_array(a, mesh)
                      for a in (x1, y1, x2, y2)]
    state, first = half(state, x1, y1, x2, y2, 0.1, 0.0, False)
    state, second = half(state, x2, y2, x1, y1, 0.1, 0.0, False)
    return state.replace(step=state.step + 1), (first, second)

  batch = pool[0]
  state, _ = iteration(state, batch['image'], batch['label'])  # compiles
  jax.block_until_ready(state)
  host = []
  start_all = time.perf_counter()
  for i in range(iterations):
    start = time.perf_counter()
    batch = pool[i % len(pool)]
    state, metrics = iteration(state, batch['image'], batch['label'])
    host.append(time.perf_counter() - start)
  jax.block_until_ready((state, metrics))
  wall = (time.perf_counter() - start_all) / iterations
  return statistics.median(host), wall


def _aligned(values: np.ndarray) -> np.ndarray:
  """`values` in a 64-byte aligned buffer, as tf.data's numpy batches are
  (on CPU devices such a buffer is placed without a copy)."""
  buffer = np.empty(values.nbytes + 64, np.uint8)
  offset = (-buffer.ctypes.data) % 64
  out = buffer[offset:offset + values.nbytes].view(values.dtype)
  out = out.reshape(values.shape)
  out[...] = values
  return out


def main(argv):
  del argv
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  shape = (_BATCH.value, _SIZE.value, _SIZE.value, 3)
  pool = [{'image': _aligned(rng.integers(0, 256, shape, dtype=np.uint8)),
           'label': _aligned(rng.integers(0, 1000, shape[:1],
                                          dtype=np.int32))}
          for _ in range(2)]
  host_s, wall_s = _time_current(mesh, pool, _ITERS.value)
  float_pool = [{'image': _aligned(b['image'].astype(np.float32)),
                 'label': b['label']} for b in pool]
  previous_s, previous_wall_s = _time_previous(mesh, float_pool,
                                               _ITERS.value)
  print(json.dumps({
      'host_ms_per_iteration': round(1e3 * host_s, 3),
      'wall_ms_per_iteration': round(1e3 * wall_s, 3),
      'previous_host_ms_per_iteration': round(1e3 * previous_s, 3),
      'previous_wall_ms_per_iteration': round(1e3 * previous_wall_s, 3),
      'global_batch': _BATCH.value, 'image_size': _SIZE.value,
      'devices': mesh.devices.size,
      'platform': mesh.devices.flat[0].platform}))


if __name__ == '__main__':
  app.run(main)
