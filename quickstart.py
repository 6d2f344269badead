#!/usr/bin/env python3
"""The two commands of the README, runnable with nothing but Python 3.10+.

  python3 quickstart.py demo   # L2W and uniform weighting, trained + compared
  python3 quickstart.py test   # run the test suite

Creates `.venv/` next to this file on first use and installs the project
into it (again whenever requirements.txt or pyproject.toml change), then
runs the command inside it. Extra arguments are passed on (e.g.
`python3 quickstart.py test -k msdnet`).
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
    'test': ['-m', 'pytest', '-q', '--numprocesses=auto', '--maxprocesses=4'],
}


def _python() -> pathlib.Path:
  return VENV / ('Scripts' if os.name == 'nt' else 'bin') / 'python'


def _fingerprint() -> str:
  digest = hashlib.sha256()
  for name in ('requirements.txt', 'pyproject.toml'):
    digest.update((ROOT / name).read_bytes())
  return digest.hexdigest()


def ensure_environment() -> pathlib.Path:
  """Creates / refreshes the virtual environment; returns its python."""
  stamp = VENV / '.l2w_installed'
  if stamp.exists() and stamp.read_text() == _fingerprint():
    return _python()
  if not _python().exists():
    print(f'creating virtual environment in {VENV}', flush=True)
    venv.create(VENV, with_pip=True)
  pip = [str(_python()), '-m', 'pip', 'install', '--disable-pip-version-check']
  subprocess.run(pip + ['--upgrade', 'pip'], check=True, cwd=ROOT)
  subprocess.run(pip + ['-r', 'requirements.txt'], check=True, cwd=ROOT)
  subprocess.run(pip + ['--no-deps', '-e', '.'], check=True, cwd=ROOT)
  stamp.write_text(_fingerprint())
  return _python()


def main(argv) -> int:
  if not argv or argv[0] not in COMMANDS:
    print(__doc__)
    return 2
  python = ensure_environment()
  command = [str(python)] + COMMANDS[argv[0]] + list(argv[1:])
  return subprocess.run(command, cwd=ROOT).returncode


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
