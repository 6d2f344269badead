"""Refusing to train on the CPU of a host that has a TPU or a GPU."""

import subprocess
import sys
import time

import pytest

from l2w_jax import accelerators
from tests.conftest import PROJECT_ROOT, subprocess_env


def _root(tmp_path, *files):
  for name in files:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('')
  return str(tmp_path)


def test_visible_hardware_reads_tpu_and_gpu_signs(tmp_path):
  assert accelerators.visible_hardware({}, _root(tmp_path)).kinds() == ()
  tpu_vm = accelerators.visible_hardware(
      {'TPU_ACCELERATOR_TYPE': 'v4-8'},
      _root(tmp_path / 'a', 'dev/accel0', 'dev/accel1'))
  assert tpu_vm.tpu == ('TPU_ACCELERATOR_TYPE=v4-8', '/dev/accel0',
                        '/dev/accel1')
  assert tpu_vm.kinds() == ('tpu',)
  v5e = accelerators.visible_hardware({}, _root(tmp_path / 'b',
                                                'dev/vfio/0', 'dev/vfio/vfio'))
  assert v5e.tpu == ('/dev/vfio/0',)  # the control node is no device
  gpu = accelerators.visible_hardware(
      {}, _root(tmp_path / 'c', 'dev/nvidia0', 'dev/nvidiactl',
                'proc/driver/nvidia/gpus/0000:00:04.0/information'))
  assert gpu.gpu == ('/dev/nvidia0', '/proc/driver/nvidia/gpus/0000:00:04.0')
  assert gpu.kinds() == ('gpu',)


@pytest.mark.parametrize('kind,install', [('tpu', "'.[tpu]'"),
                                          ('gpu', "'.[cuda]'")])
def test_hardware_without_jax_support_stops_with_the_install_command(
    kind, install):
  hardware = accelerators.Hardware(**{kind: ('/dev/x0',)})
  with pytest.raises(accelerators.PlatformError) as error:
    accelerators.check_before_start(hardware=hardware, support=set())
  message = str(error.value)
  assert install in message and accelerators.OVERRIDE in message
  assert '/dev/x0' in message and '\n' not in message
  # Installed support, or the override, lets it start.
  accelerators.check_before_start(hardware=hardware, support={kind})
  accelerators.check_before_start(True, hardware=hardware, support=set())
  # Only CPU devices despite the hardware (a plugin that found nothing).
  with pytest.raises(accelerators.PlatformError, match='only CPU devices'):
    accelerators.check_after_start(hardware=hardware, platform='cpu')
  accelerators.check_after_start(hardware=hardware, platform=kind)
  accelerators.check_after_start(True, hardware=hardware, platform='cpu')
  # No hardware: the CPU is what there is.
  accelerators.check_before_start(hardware=accelerators.Hardware(),
                                  support=set())
  accelerators.check_after_start(hardware=accelerators.Hardware(),
                                 platform='cpu')


def test_this_install_is_cpu_only():
  # The suite runs on the CPU-only jaxlib of requirements.txt.
  assert 'tpu' not in accelerators.installed_support()


def test_a_tpu_host_with_the_cpu_jaxlib_stops_before_anything_is_built(
    tmp_path):
  env = subprocess_env()
  env['TPU_ACCELERATOR_TYPE'] = 'v4-8'
  workdir = tmp_path / 'run'
  start = time.perf_counter()
  run = subprocess.run(
      [sys.executable, '-m', 'experiments.main', '--config=configs/digits.py',
       f'--workdir={workdir}'], cwd=PROJECT_ROOT, env=env,
      capture_output=True, text=True, timeout=120, check=False)
  seconds = time.perf_counter() - start
  assert run.returncode == 1, run.stderr[-2000:]
  # (TensorFlow's C++ start-up lines may come before it.)
  assert 'Traceback' not in run.stderr, run.stderr[-2000:]
  line = run.stderr.strip().splitlines()[-1]
  assert line.startswith('error: this host has a TPU'), line
  assert "pip install -e '.[tpu]'" in line
  assert 'TPU_ACCELERATOR_TYPE=v4-8' in line
  assert accelerators.OVERRIDE in line
  assert not workdir.exists()
  assert seconds < 60, seconds
