"""The command-line entry points, `python -m experiments.<name>`.

Importing this package, which every entry point does first, keeps
TensorFlow's C++ logs (TensorFlow serves only the input pipelines) to
errors; that has to happen before TensorFlow is imported.

It also holds a Ctrl-C (SIGINT) that arrives while an entry point imports
its libraries: raised inside TensorFlow's or JAX's imports, the
KeyboardInterrupt printed a traceback or was swallowed by a library's
catch-all handler, and the run went on training as if nothing had been
sent (`benchmarks.soak` met both). Held, it ends the process with one line
and status 130 as soon as the entry point starts (`release_interrupt`).
"""

import os
import signal
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_HELD = []


def _hold(signum, frame):
  del frame
  _HELD.append(signum)


def release_interrupt() -> None:
  """Gives Ctrl-C back to Python (a KeyboardInterrupt); if one came while
  the entry point imported, exits now: status 130, one line."""
  if signal.getsignal(signal.SIGINT) is _hold:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if _HELD:
    print('interrupted while starting; nothing was done', file=sys.stderr,
          flush=True)
    sys.exit(130)


# Only in `python -m experiments.<name>` (sys.argv[0] is '-m' while the
# module is being found), and only where Ctrl-C is Python's (not ignored).
if (sys.argv[:1] == ['-m'] and
    signal.getsignal(signal.SIGINT) is signal.default_int_handler):
  signal.signal(signal.SIGINT, _hold)
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _app.call_after_init(release_interrupt)
