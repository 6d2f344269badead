"""What the entry points share: how they stop on an error."""

import os
import sys


def exit_with_message(message: str, status: int) -> None:
  """Prints `message` as one line to stderr and exits with `status` at once:
  skipping interpreter teardown keeps checkpoint and pipeline threads still
  winding down from printing tracebacks after the message."""
  print(' '.join(message.split()), file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)  # pylint: disable=protected-access
