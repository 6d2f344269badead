"""What a process of a multi-process run says when another one is lost.

When a process of the run dies (kill -9, a lost host), JAX's coordination
service notices that it stopped sending heartbeats
(`distributed.heartbeat_timeout_seconds`) and every surviving process
aborts from a C++ thread: an `F...` log line, a multi-line status and a
C++ stack trace, with error lines of the service before it. When the
coordinator (process 0) is the one lost, the survivors abort at once.
Neither can be caught in Python: the abort comes from the service's
error-polling thread, and the callback that could replace it cannot be
called from Python in this jaxlib (its status argument raises
std::bad_cast).

So a multi-process run sends its stderr through a relay (this file, run
as a separate process: `start_relay`): the relay passes every line on,
holds back the coordination service's error lines for a moment, and when
JAX's fatal report follows, prints one line instead of the report (which
process was lost, that the saved checkpoints are intact, the commands to
rerun). Being another process, it still has every byte of the trainer's
stderr after the trainer dies, so nothing a crash writes is lost: lines
that are not part of a lost-peer report are passed on unchanged.

A lost peer can also surface in the main thread first, as a
`JaxRuntimeError` of a collective (gloo's "Connection reset by peer") or
of the coordination service: `is_peer_loss` recognises it and the entry
point prints the same line (`message`), which the relay then passes on once.

This module imports only the standard library at the top: the relay runs
it as a script.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time


class PeerLost(RuntimeError):
  """A multi-process run stopped because another process is gone; the
  message is the one line (`message`)."""


# How JAX's fatal report of the coordination service begins (client.h).
FATAL_MARK = (b'Terminating process because the JAX distributed service '
              b'detected fatal errors')
# The start of the one line (the relay prints it at most once).
LINE_START = 'error: lost a process of this run'
# The exit status of a process that stops because a peer was lost:
# EX_TEMPFAIL, "try again" (the abort itself exits with SIGABRT).
EXIT_STATUS = 75
# An error line of the coordination service or of the preemption service
# on top of it (absl's log prefix): held back in case JAX's fatal report
# follows.
_SERVICE_LINE = re.compile(
    rb'^[EW]\d{4} [\d:.]+\s+\d+ (coordination_service|preemption_sync)')
_HOLD_SECONDS = 3.0
# Strings of a runtime error that means a peer process is gone.
_PEER_LOSS_ERRORS = ('Connection reset by peer', 'Connection refused',
                     'Socket closed', 'coordination service',
                     'stopped sending heartbeats', 'Gloo')


def who_was_lost(report: str) -> str:
  """Which process a report or an error names as lost, in words."""
  m = re.search(r'stopped sending heartbeats\):\s*(.*?)\s*The tasks have',
                report, re.S)
  if m:
    ids = re.findall(r'task:(\d+)', m.group(1)) or re.findall(
        r'\d+', m.group(1))
    if ids:
      return (f'process {ids[0]} stopped sending heartbeats' if
              len(ids) == 1 else
              f'processes {", ".join(ids)} stopped sending heartbeats')
  if re.search(r'leader task|Failed to send RPC to coordination service',
               report):
    return 'the coordinator, process 0, cannot be reached'
  if 'Gloo' in report:
    return 'a collective lost its connection to another process'
  return 'the coordination service reported a lost process'


def resume_hint(num_processes: int | None, checkpoints: str) -> str:
  """What to do after a lost peer: rerun every process's command."""
  commands = (f'the same {num_processes} commands' if num_processes else
              'the same command on every host')
  return (f'once every host is up, rerun {commands} to resume from the '
          f'newest complete checkpoint in {checkpoints}')


def message(who: str, hint: str) -> str:
  """The one line of a lost peer.

  Args:
    who: which process was lost, in words (`who_was_lost`).
    hint: what to do to resume (`resume_hint`).
  """
  return (f'{LINE_START} ({who}); the checkpoints already saved are intact '
          f'(one being written counts only once complete): {hint}')


def is_peer_loss(error: BaseException) -> bool:
  """Whether `error`, raised by JAX in a multi-process run, means that a
  peer process is gone (a collective or the coordination service lost its
  connection)."""
  text = str(error)
  return any(s in text for s in _PEER_LOSS_ERRORS)


def start_relay(hint: str) -> subprocess.Popen | None:
  """Sends this process's stderr (file descriptor 2) through a relay
  process that turns JAX's report of a lost peer into one line (see the
  module docstring). Returns the relay, or None where there is nothing to
  relay to (no stderr).

  Args:
    hint: the end of the line, what to do to resume (`resume_hint`).
  """
  try:
    target = os.dup(2)
  except OSError:
    return None
  read_end, write_end = os.pipe()
  relay = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), hint],
      stdin=read_end, stdout=target, stderr=target, close_fds=True)
  os.close(read_end)
  os.close(target)
  sys.stderr.flush()
  os.dup2(write_end, 2)
  os.close(write_end)
  return relay


def _relay(source: int, target: int, hint: str) -> None:
  """Copies lines from `source` to `target` until end of file, replacing a
  lost-peer report by one line."""
  held, held_since = [], 0.0  # coordination-service lines held back
  report = None  # lines of JAX's fatal report once it began
  printed = False
  pending = b''
  line_start = LINE_START.encode()

  def write(data: bytes) -> None:
    os.write(target, data)

  def finish_report() -> None:
    nonlocal printed
    if not printed:
      text = b''.join(held + (report or [])).decode(errors='replace')
      write((message(who_was_lost(text), hint) + '\n').encode())
      printed = True

  while True:
    timeout = None
    if held and report is None:
      timeout = max(0.0, held_since + _HOLD_SECONDS - time.monotonic())
    ready, _, _ = select.select([source], [], [], timeout)
    if not ready:  # held lines not followed by a fatal report
      write(b''.join(held))
      held = []
      continue
    chunk = os.read(source, 65536)
    if not chunk:
      break
    lines = (pending + chunk).split(b'\n')
    pending = lines.pop()
    for line in (l + b'\n' for l in lines):
      if report is not None:
        report.append(line)
        if b'*** Check failure stack trace' in line:
          finish_report()
      elif FATAL_MARK in line:
        report = [line]
      elif line.startswith(line_start):
        if not printed:
          write(line)
        printed = True
        held = []
      elif _SERVICE_LINE.match(line) or held:
        if not held:
          held_since = time.monotonic()
        held.append(line)
      else:
        write(line)
  if report is not None:
    finish_report()
  else:
    write(b''.join(held) + pending)


if __name__ == '__main__':
  # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the
  # relay keeps passing lines on until the trainer has said its last.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  _relay(0, 1, sys.argv[1])
