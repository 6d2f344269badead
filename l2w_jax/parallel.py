"""Data parallelism over a ('data',) device mesh, on one host or many.

The original trains with PyTorch DDP: every device takes its own shard of the
global batch, splits *that shard* into the two halves, runs the meta step with
its own BatchNorm batch statistics and its own exit allocation, and the
gradients of the backbone and of the weight net are averaged over devices
before each optimizer step. Here that is one `jax.shard_map` over a 1-D mesh:
the batch is sharded along 'data', the train state is replicated, and the half
step runs per device with `lax.pmean` of its gradients (`Learner.reduce_grads`).

Running BatchNorm statistics stay per device in DDP, but DDP broadcasts rank
0's buffers to every rank at each forward, so the statistics the original
uses and saves are device 0's (`train.bn_stats = 'device0'`, the default);
`'mean'` averages them over devices instead. `train.sync_bn` normalises with
statistics over the whole global half-batch (PyTorch's SyncBatchNorm).

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` (on
TPU VMs without arguments; elsewhere with `config.distributed.*`), each
process reads its own part of every global batch, and
`jax.make_array_from_process_local_data` assembles the global arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from typing import Callable, Iterator, TypeVar

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from l2w_jax import peer_loss
from l2w_jax.models import DATA_AXIS

T = TypeVar('T')

# A process whose heartbeats stop for this long is lost, and the others stop
# (30.0 s after a kill -9 in test_sharding's 2-process run); JAX's default
# is 100 s. `distributed.heartbeat_timeout_seconds` overrides it.
HEARTBEAT_TIMEOUT_SECONDS = 30
# How long a process waits for all the others to connect at the start.
INITIALIZATION_TIMEOUT_SECONDS = 300
BN_STATS_RULES = ('device0', 'mean')
# How gradients and other per-device values are averaged over devices:
# 'all_reduce' (XLA's, whose summation order depends on the device layout
# and the collective library) or 'ordered' (every device gathers all
# values and sums them in device order: the same bits on any layout of the
# same mesh, at the cost of holding N copies of each reduced tree).
REDUCTIONS = ('all_reduce', 'ordered')


def _on_multi_host_tpu() -> bool:
  """Whether this is one host of a multi-host TPU slice (several worker
  hostnames, or a multislice coordinator), where `jax.distributed.initialize()`
  finds its coordinator by itself."""
  return (',' in os.environ.get('TPU_WORKER_HOSTNAMES', '') or
          bool(os.environ.get('MEGASCALE_COORDINATOR_ADDRESS')))


def initialize_distributed(config, resume_hint: str = '') -> None:
  """Starts multi-process JAX once, before any computation, when the run has
  several processes: explicitly with `config.distributed.coordinator_address`
  (CPU/GPU clusters, local tests), automatically on a multi-host TPU slice.
  Does nothing for a single process or when already initialised.

  A process that stops sending heartbeats for
  `distributed.heartbeat_timeout_seconds` is lost, and the others stop;
  their stderr goes through `peer_loss.start_relay`, which turns JAX's
  report of that into one line ending with `resume_hint`.
  """
  if jax.distributed.is_initialized():
    return
  dist = config.get('distributed')
  address = dist.get('coordinator_address') if dist else None
  timeouts = {
      'heartbeat_timeout_seconds': int(dist.get(
          'heartbeat_timeout_seconds', HEARTBEAT_TIMEOUT_SECONDS)),
      'initialization_timeout': int(dist.get(
          'initialization_timeout_seconds', INITIALIZATION_TIMEOUT_SECONDS)),
  } if dist else {}
  if address:
    if dist.num_processes < 1 or not 0 <= dist.process_id < dist.num_processes:
      raise ValueError(
          f'distributed.process_id must be in [0, distributed.num_processes); '
          f'got process_id={dist.process_id}, num_processes='
          f'{dist.num_processes}')
    if dist.num_processes > 1:
      peer_loss.start_relay(resume_hint)
    jax.distributed.initialize(coordinator_address=address,
                               num_processes=dist.num_processes,
                               process_id=dist.process_id, **timeouts)
  elif _on_multi_host_tpu():
    peer_loss.start_relay(resume_hint)
    jax.distributed.initialize(**timeouts)


def process_0_first(fn: Callable[[], T]) -> T:
  """fn() on process 0, then, once it returned, on the others (all
  processes wait at a barrier in between): something fn writes into a
  directory the hosts share (a dataset prepared on first use) is written
  once, not raced. fn() alone on one process."""
  if jax.process_count() == 1:
    return fn()
  if jax.process_index() == 0:
    out = fn()
    multihost_utils.sync_global_devices('l2w_jax: process 0 first')
    return out
  multihost_utils.sync_global_devices('l2w_jax: process 0 first')
  return fn()


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over all devices of all processes, or over
  `num_devices` of them: the first `num_devices` on one process, the first
  `num_devices / process_count` local devices of every process on several
  (every process must feed its share of each batch)."""
  devices = jax.devices()
  if num_devices <= 0:
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))
  if num_devices > len(devices):
    raise ValueError(f'distributed.num_devices={num_devices} but only '
                     f'{len(devices)} devices are available')
  processes = jax.process_count()
  if processes > 1:
    per_process, remainder = divmod(num_devices, processes)
    if remainder or per_process > jax.local_device_count():
      raise ValueError(
          f'distributed.num_devices={num_devices} cannot be spread evenly '
          f'over {processes} processes of {jax.local_device_count()} '
          'devices each: use a multiple of the process count, or 0 (all)')
    devices = [d for p in range(processes)
               for d in [d for d in devices if d.process_index == p
                         ][:per_process]]
  else:
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def connect_processes(mesh: jax.sharding.Mesh) -> None:
  """With several processes, runs one all-gather and one all-reduce over
  `mesh` at once, so that the processes connect to each other (on CPU,
  gloo's TCP pairs for the mesh's devices) while they are still in step,
  right after start-up. Otherwise the first training iteration connects,
  after each process restored and compiled at its own pace, and on a
  loaded machine the one done first can give up waiting ("Gloo context
  initialization failed: Connect timeout"). A no-op on one process."""
  if jax.process_count() == 1:
    return

  def both(x):
    return jax.lax.psum(x, DATA_AXIS) + jnp.sum(
        jax.lax.all_gather(x, DATA_AXIS))

  ones = jax.make_array_from_callback(
      (mesh.size,), NamedSharding(mesh, P(DATA_AXIS)),
      lambda index: np.ones((1,), np.float32))
  out = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=P(DATA_AXIS),
                              out_specs=P(DATA_AXIS)))(ones)
  jax.block_until_ready(out)


# XLA's CPU pipeline runs this pass before CSE: it deletes the optimization
# barriers `jax.checkpoint` puts around the recomputed forward, and CSE then
# merges the recomputation back into the original forward, so remat keeps
# every activation alive and saves nothing. Without the pass the barriers
# stay and the recomputation happens in the backward pass, as on GPU/TPU.
_BARRIER_EXPANDER = 'cse_barrier_expander'


def compiler_options(remat: bool, platform: str) -> dict | None:
  """XLA options under which `jax.checkpoint` (`meta.remat`) bounds memory on
  `platform` ('cpu', 'gpu', 'tpu'): on CPU with `remat`, the barrier
  expander disabled; otherwise None (XLA's defaults). Values are unchanged
  either way: the barriers only order computations."""
  if remat and platform == 'cpu':
    return {'xla_disable_hlo_passes': _BARRIER_EXPANDER}
  return None


def step_compiler_options(model, mesh) -> dict | None:
  """`compiler_options` for a step of `model` (a backbone or a method's
  network around one: its `cfg.remat` says whether it rematerialises) on
  `mesh`'s devices."""
  return compiler_options(bool(model.cfg.remat),
                          mesh.devices.flat[0].platform)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def local_device_count(mesh) -> int:
  """Devices of the mesh that belong to this process."""
  return sum(d.process_index == jax.process_index()
             for d in mesh.devices.flat)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How a global batch spreads over devices and processes."""
  global_batch: int
  num_devices: int
  num_processes: int

  @property
  def per_device_batch(self) -> int:
    return self.global_batch // self.num_devices

  @property
  def per_process_batch(self) -> int:
    return self.global_batch // self.num_processes

  def describe(self) -> str:
    return (f'{self.num_devices} devices on {self.num_processes} '
            f'process(es): per-device batch {self.per_device_batch}, global '
            f'batch {self.global_batch}')


def batch_layout(config, mesh) -> BatchLayout:
  """The global / per-device batch of `config` on `mesh`; raises ValueError
  naming the fields when the batch does not divide or cannot be halved."""
  num_devices = mesh.devices.size
  train = config.train
  per_device = train.get('per_device_batch_size') or 0
  if per_device > 0:
    global_batch = per_device * num_devices
    if train.batch_size not in (-1, 0, global_batch):
      raise ValueError(
          f'train.batch_size={train.batch_size} contradicts '
          f'train.per_device_batch_size={per_device} x {num_devices} devices '
          f'= {global_batch}; set only one of them (batch_size=-1)')
  else:
    global_batch = train.batch_size
    if global_batch <= 0:
      raise ValueError(f'train.batch_size: must be > 0, got {global_batch}')
    if global_batch % num_devices:
      raise ValueError(
          f'train.batch_size={global_batch} does not divide into the '
          f'{num_devices} devices; use a multiple of {num_devices} (or set '
          'train.per_device_batch_size)')
  if global_batch // num_devices < 2:
    raise ValueError(
        f'per-device batch {global_batch // num_devices} (train.batch_size='
        f'{global_batch} over {num_devices} devices) cannot be split into two '
        'non-empty halves: use at least 2 samples per device')
  return BatchLayout(global_batch, num_devices, jax.process_count())


def global_array(local: np.ndarray, mesh) -> jax.Array:
  """This process's rows -> the global array sharded along 'data'."""
  return jax.make_array_from_process_local_data(batch_sharded(mesh), local)


def prefetch_to_mesh(batches: Iterator[dict], mesh,
                     size: int = 2) -> Iterator[dict]:
  """Yields the batches of `batches` (dicts of this process's numpy rows) as
  global arrays sharded along 'data', keeping `size` batches ahead already
  on their way to the devices (transfers are asynchronous), so that the
  step never waits for the host-to-device copy of its own batch.

  Each device receives only its own rows; nothing is copied on the host.
  """
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(batches, n):
      queue.append({k: global_array(np.asarray(v), mesh)
                    for k, v in batch.items()})

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)


def pmean(axis_name: str = DATA_AXIS, reduction: str = 'all_reduce'
          ) -> Callable:
  """Tree -> its mean over the devices of `axis_name` (inside shard_map).

  Args:
    axis_name: the mesh axis to average over.
    reduction: 'all_reduce' (`lax.pmean`) or 'ordered' (`lax.all_gather`,
      then a sum over the gathered axis in device order divided by the
      device count: no collective arithmetic, so 1 process x 8 devices and
      2 processes x 4 devices give the same bits; see `REDUCTIONS`).

  Returns:
    f(tree) -> tree of the same shapes, equal on every device.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f'distributed.reduction: unknown reduction '
                     f'{reduction!r}; use one of {REDUCTIONS}')
  if reduction == 'all_reduce':
    return lambda tree: jax.lax.pmean(tree, axis_name)

  def ordered_mean(x):
    gathered = jax.lax.all_gather(x, axis_name)  # (N, ...) in device order
    return jax.numpy.sum(gathered, axis=0) / gathered.shape[0]

  return lambda tree: jax.tree_util.tree_map(ordered_mean, tree)


def from_device0(axis_name: str = DATA_AXIS) -> Callable:
  """Tree -> device 0's value on every device (DDP's buffer broadcast): one
  psum of the tree masked to device 0."""

  def broadcast(tree):
    first = jax.lax.axis_index(axis_name) == 0
    return jax.lax.psum(jax.tree_util.tree_map(
        lambda x: jax.numpy.where(first, x, jax.numpy.zeros_like(x)), tree),
                        axis_name)

  return broadcast


def batch_stats_reduction(rule: str, reduction: str = 'all_reduce'
                          ) -> Callable:
  """How per-device running statistics become the replicated state:
  'device0' (DDP's buffer broadcast, exact in any summation order: the
  other devices add zeros) or 'mean' over devices (by `reduction`). With
  `train.sync_bn` every device moves them identically, and both rules agree."""
  if rule not in BN_STATS_RULES:
    raise ValueError(f'train.bn_stats: unknown rule {rule!r}; use one of '
                     f'{BN_STATS_RULES}')
  return from_device0() if rule == 'device0' else pmean(reduction=reduction)
