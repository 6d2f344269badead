"""What the entry points share: how they stop on an error."""

import os
import sys

from absl import app
from absl import flags
from absl import logging


def exit_with_message(message: str, status: int) -> None:
  """Prints `message` as one line to stderr and exits with `status` at once:
  skipping interpreter teardown keeps checkpoint and pipeline threads still
  winding down from printing tracebacks after the message."""
  print(' '.join(message.split()), file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access


def start_quietly(argv) -> None:
  """What an evaluation-style main does first: refuses stray arguments and,
  unless --verbosity was given, keeps absl's INFO lines out of the output."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)


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
