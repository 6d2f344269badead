#!/usr/bin/env python3
"""The two commands of the README, runnable with nothing but Python 3.10+.

  python3 quickstart.py demo   # L2W and uniform weighting, trained + compared
  python3 quickstart.py test   # run the test suite
  python3 quickstart.py run MODULE [ARGS]   # python -m MODULE ARGS in the venv

Creates `.venv/` next to this file on first use and installs the project
into it (again whenever requirements.txt, pyproject.toml or the accelerator
change), then runs the command inside it. Extra arguments are passed on
(e.g. `python3 quickstart.py test -k msdnet`).

On a TPU VM or a GPU node, put `--accelerator=tpu` or `--accelerator=cuda`
first: the environment then also gets JAX for that accelerator (the
project's `[tpu]` / `[cuda]` extras), e.g.
`python3 quickstart.py --accelerator=tpu run experiments.main
--config=configs/imagenet.py --workdir=gs://BUCKET/run`.
"""

import hashlib
import os
import pathlib
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parent
VENV = pathlib.Path(os.environ.get('L2W_VENV', ROOT / '.venv'))
COMMANDS = {
    'demo': ['-m', 'experiments.demo', '--workdir=workdir/demo'],
    # The 15 slowest tests are listed at the end, to keep the suite short.
    'test': ['-m', 'pytest', '-q', '--numprocesses=auto', '--maxprocesses=4',
             '--durations=15'],
    'run': ['-m'],
}
# --accelerator=NAME -> the extra of pyproject.toml installed with it.
ACCELERATORS = {'cpu': None, 'tpu': 'tpu', 'cuda': 'cuda', 'cuda13': 'cuda13'}


def _python() -> pathlib.Path:
  return VENV / ('Scripts' if os.name == 'nt' else 'bin') / 'python'


def _fingerprint(accelerator: str) -> str:
  digest = hashlib.sha256(accelerator.encode())
  for name in ('requirements.txt', 'pyproject.toml'):
    digest.update((ROOT / name).read_bytes())
  return digest.hexdigest()


def ensure_environment(accelerator: str = 'cpu') -> pathlib.Path:
  """Creates / refreshes the virtual environment (with JAX for
  `accelerator`, a key of ACCELERATORS); returns its python."""
  stamp = VENV / '.l2w_installed'
  if stamp.exists() and stamp.read_text() == _fingerprint(accelerator):
    return _python()
  if not _python().exists():
    print(f'creating virtual environment in {VENV}', flush=True)
    venv.create(VENV, with_pip=True)
  pip = [str(_python()), '-m', 'pip', 'install', '--disable-pip-version-check']
  subprocess.run(pip + ['--upgrade', 'pip'], check=True, cwd=ROOT)
  subprocess.run(pip + ['-r', 'requirements.txt'], check=True, cwd=ROOT)
  subprocess.run(pip + ['--no-deps', '-e', '.'], check=True, cwd=ROOT)
  extra = ACCELERATORS[accelerator]
  if extra:  # the accelerator's jax plugin and its dependencies
    subprocess.run(pip + ['-e', f'.[{extra}]'], check=True, cwd=ROOT)
  stamp.write_text(_fingerprint(accelerator))
  return _python()


def main(argv) -> int:
  accelerator = 'cpu'
  if argv and argv[0].startswith('--accelerator='):
    accelerator = argv[0].split('=', 1)[1]
    argv = argv[1:]
    if accelerator not in ACCELERATORS:
      print(f'--accelerator: one of {sorted(ACCELERATORS)}, got '
            f'{accelerator!r}')
      return 2
  if not argv or argv[0] not in COMMANDS or (argv[0] == 'run' and
                                             len(argv) < 2):
    print(__doc__)
    return 2
  python = ensure_environment(accelerator)
  command = [str(python)] + COMMANDS[argv[0]] + list(argv[1:])
  return subprocess.run(command, cwd=ROOT).returncode


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
