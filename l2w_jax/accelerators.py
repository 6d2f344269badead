"""Which accelerator a run trains on, and refusing to train on the CPU by
mistake.

A TPU VM or GPU node with the CPU-only jaxlib (what `requirements.txt`
pins) would silently train on its host CPU: JAX falls back to the CPU with
a warning. `check_before_start` stops such a run in one line naming the
install command, before JAX initialises any backend (a multi-host run must
call `jax.distributed.initialize` first); `check_after_start` catches a
plugin that is installed but found no device. `distributed.allow_cpu`
overrides both.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
from typing import Mapping

import jax

# What to install for each kind of accelerator (the extras of pyproject.toml).
INSTALL = {
    'tpu': "pip install -e '.[tpu]' (or: python3 quickstart.py --accelerator=tpu ...)",
    'gpu': "pip install -e '.[cuda]' (or: python3 quickstart.py --accelerator=cuda ...)",
}
OVERRIDE = '--config.distributed.allow_cpu=True'


class PlatformError(RuntimeError):
  """Accelerator hardware is present but JAX would run on the CPU."""


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Visible signs of accelerators on this host (empty: none)."""
  tpu: tuple[str, ...] = ()
  gpu: tuple[str, ...] = ()

  def kinds(self) -> tuple[str, ...]:
    return tuple(k for k in ('tpu', 'gpu') if getattr(self, k))


def _devices(root: str, *patterns: str) -> tuple[str, ...]:
  found = []
  for pattern in patterns:
    found += sorted(glob.glob(os.path.join(root, pattern)))
  return tuple('/' + os.path.relpath(f, root) for f in found)


def visible_hardware(environ: Mapping[str, str] | None = None,
                     root: str = '/') -> Hardware:
  """Signs of TPUs and NVIDIA GPUs that need no JAX backend to see.

  Args:
    environ: the environment (default `os.environ`).
    root: the filesystem root under which /dev and /proc are looked at
      (tests point it at a directory they fill).

  Returns:
    Hardware listing each sign found: TPU environment variables of TPU VMs
    and GKE (`TPU_ACCELERATOR_TYPE`, `TPU_WORKER_HOSTNAMES`), /dev/accel*
    (TPU v2-v4), /dev/vfio/<n> (TPU v5e and later); /dev/nvidia<n> and
    /proc/driver/nvidia/gpus/* (NVIDIA GPUs).
  """
  environ = os.environ if environ is None else environ
  tpu = tuple(f'{name}={environ[name]}'
              for name in ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES')
              if environ.get(name))
  tpu += _devices(root, 'dev/accel[0-9]*', 'dev/vfio/[0-9]*')
  gpu = _devices(root, 'dev/nvidia[0-9]*', 'proc/driver/nvidia/gpus/*')
  return Hardware(tpu=tpu, gpu=gpu)


def installed_support() -> set[str]:
  """The accelerator kinds ('tpu', 'gpu') whose JAX support is installed,
  found without initialising a backend: libtpu for TPUs, a CUDA (or ROCm)
  PJRT plugin for GPUs."""
  kinds = set()
  if any(importlib.util.find_spec(m) for m in ('libtpu', 'libtpu_nightly')):
    kinds.add('tpu')
  plugins = {e.name for e in importlib.metadata.entry_points(
      group='jax_plugins')}
  modules = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm7_plugin')
  if (any('cuda' in p or 'rocm' in p for p in plugins) or
      any(importlib.util.find_spec(m) for m in modules)):
    kinds.add('gpu')
  return kinds


def _message(kind: str, hardware: Hardware, problem: str) -> str:
  signs = ', '.join(getattr(hardware, kind)[:3])
  return (f'this host has a {kind.upper()} ({signs}) but {problem}, so the '
          f'run would train on the CPU: install JAX for it with '
          f'{INSTALL[kind]}, or pass {OVERRIDE} to train on the CPU anyway')


def check_before_start(allow_cpu: bool = False,
                       hardware: Hardware | None = None,
                       support: set[str] | None = None) -> None:
  """Raises PlatformError when accelerator hardware is visible but JAX's
  support for it is not installed. Initialises no JAX backend."""
  if allow_cpu:
    return
  hardware = visible_hardware() if hardware is None else hardware
  support = installed_support() if support is None else support
  for kind in hardware.kinds():
    if kind not in support:
      raise PlatformError(_message(
          kind, hardware, 'the installed jaxlib is CPU-only (no '
          f'{"libtpu" if kind == "tpu" else "CUDA plugin"})'))


def check_after_start(allow_cpu: bool = False,
                      hardware: Hardware | None = None,
                      platform: str | None = None) -> None:
  """Raises PlatformError when accelerator hardware is visible but JAX's
  devices are CPUs (a plugin that found no device, `JAX_PLATFORMS=cpu`)."""
  if allow_cpu:
    return
  hardware = visible_hardware() if hardware is None else hardware
  platform = jax.default_backend() if platform is None else platform
  if hardware.kinds() and platform == 'cpu':
    kind = hardware.kinds()[0]
    raise PlatformError(_message(
        kind, hardware, 'JAX found only CPU devices (JAX_PLATFORMS='
        f'{os.environ.get("JAX_PLATFORMS", "unset")}; another process may '
        'hold the device)'))


def describe_devices() -> str:
  """One line: platform, device kind, device and process counts."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  return (f'platform {devices[0].platform}: {len(devices)} device(s) '
          f'({", ".join(kinds)}), {jax.local_device_count()} on this '
          f'process, {jax.process_count()} process(es)')
