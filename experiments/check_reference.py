r"""Checks this implementation against fixtures of the original PyTorch code.

  python -m experiments.check_reference ../shared/reference/*.npz
  python -m experiments.check_reference FIXTURE.npz --save OUT.npz

Prints one JSON line per fixture and exits non-zero if any check fails or a
fixture cannot be run. A fixture without `expected...` entries is computed
and (with --save) saved, and compared with nothing. With several fixtures,
--save names a directory that receives one file per fixture.
"""

import argparse
import json
import os
import sys

import experiments


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('fixtures', nargs='+', help='.npz fixture files')
  parser.add_argument('--save', help='where to write what was computed')
  return parser.parse_args(argv)


def _save_path(save: str, fixture: str, count: int) -> str:
  if count == 1 and not os.path.isdir(save):
    return save
  return os.path.join(save, os.path.basename(fixture))


def main(argv=None) -> int:
  args = _parse(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from l2w_jax import reference  # pylint: disable=g-import-not-at-top
  # float64 fixtures need x64 before any array exists; float32 ones cast
  # their inputs and parameters explicitly, so both run in one process.
  if reference.needs_float64(args.fixtures):
    jax.config.update('jax_enable_x64', True)
  failures = 0
  for path in args.fixtures:
    try:
      result = reference.run_fixture(path)
    except (reference.FixtureError, ValueError, FileNotFoundError) as e:
      failures += 1
      print(json.dumps({'fixture': path, 'passed': False,
                        'error': str(e)}), flush=True)
      continue
    if args.save:
      result.save(_save_path(args.save, path, len(args.fixtures)))
    failures += not result.passed
    print(json.dumps(result.summary()), flush=True)
  return 1 if failures else 0


if __name__ == '__main__':
  experiments.release_interrupt()  # not an absl app
  sys.exit(main())
