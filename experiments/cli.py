"""What the entry points share: how they start (quietly, with the
persistent compilation cache) and how they stop on an error."""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from l2w_jax import compilation

_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache', None,
    'Directory of the persistent compilation cache, shared by all runs '
    '(a second run, a resume or an evaluation of the same config loads its '
    'programs instead of compiling them); "none" turns it off. Default: '
    '$L2W_JAX_COMPILATION_CACHE, else $JAX_COMPILATION_CACHE_DIR, else '
    '~/.cache/l2w_jax/xla.')


def enable_compilation_cache() -> str | None:
  """Turns on the persistent compilation cache of --compilation_cache (see
  `compilation.enable_cache`); returns its directory (None: off)."""
  return compilation.enable_cache(_COMPILATION_CACHE.value)


def exit_with_message(message: str, status: int) -> None:
  """Prints `message` as one line to stderr and exits with `status` at once:
  skipping interpreter teardown keeps checkpoint and pipeline threads still
  winding down from printing tracebacks after the message."""
  print(' '.join(message.split()), file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access


def one_line(error: BaseException) -> str:
  """`error` as one line: its type (unless its message already reads as a
  sentence of this project's) and message."""
  text = ' '.join(str(error).split())
  return text if text.startswith('cannot ') else (
      f'{type(error).__name__}: {text}')


def os_error_line(error: OSError, workdir: str) -> str:
  """The `error: ...` line of an OSError that stopped a command writing the
  run in `workdir`: for lack of room, what to free (`no_space_message`)."""
  from l2w_jax.training.workdir import no_space_message  # pylint: disable=g-import-not-at-top
  return f'error: {no_space_message(error, workdir) or one_line(error)}'


def start_quietly(argv) -> None:
  """What an evaluation-style main does first: refuses stray arguments and,
  unless --verbosity was given, keeps absl's INFO lines out of the output."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)
  enable_compilation_cache()


def run_with_one_line_errors(main, errors=(FileNotFoundError, ValueError,
                                           RuntimeError)) -> None:
  """app.run(main); an exception of `errors` becomes `error: <message>` on
  one line of stderr (multi-line messages joined) and exit status 1."""
  try:
    app.run(main)
  except SystemExit:
    raise
  except errors as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
    sys.exit(1)
  except OSError as e:  # a full disk, a file that cannot be written or read
    print(f'error: {one_line(e)}', file=sys.stderr, flush=True)
    sys.exit(1)
