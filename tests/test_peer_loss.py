"""The stderr relay of a multi-process run: JAX's report of a lost peer
becomes one line, everything else passes unchanged (the whole-run check is
`test_sharding.test_two_processes_train_like_one_process_on_the_same_mesh`).
"""

import os
import select
import subprocess
import sys
import time

from l2w_jax import peer_loss

HINT = 'rerun the same 2 commands'

# What process 0 of a 2-process run printed on stderr when process 1 was
# killed (jaxlib 0.10, heartbeat timeout 20 s; stack trace shortened).
HEARTBEATS_STOPPED = """\
E1204 18:41:15.527639    2700 coordination_service.cc:1549] [865692456547275279] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
E1204 18:41:15.528161    2711 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1204 18:41:15.528317    2711 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further.

RPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow.CoordinationServiceError='']
*** Check failure stack trace: ***
    @     0x7f8e33240634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
    @     0x7f8e3a6a71f5  (unknown)
"""

# What process 1 printed when process 0, the coordinator, was killed (the
# first line from experiments.main, the others from a test script).
COORDINATOR_GONE = """\
E1204 19:10:55.009418    7632 preemption_sync_manager.cc:159] Failed to cancel preemption barrier: FAILED_PRECONDITION: Tried to cancel non-existent barrier PREEMPTION_SYNC_BARRIER. [type.googleapis.com/tensorflow.CoordinationServiceError='']
E1204 18:37:57.168061    2437 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1204 18:37:57.168078    2437 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. absl::Status: UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was preempted/died/restarted unexpectedly or this task is experiencing network issues. Check earlier logs from 1) this task, 2) the leader (usually slice 0 task 0), and 3) cluster scheduler to debug further.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_message:"Socket closed", grpc_status:14}
*** Check failure stack trace: ***
    @     0x7f7025f0c93b  std::_Function_handler<>::_M_invoke()
"""


def _relayed(text: str) -> str:
  """What the relay prints for `text` written to its input."""
  return subprocess.run(
      [sys.executable, peer_loss.__file__, HINT], input=text,
      capture_output=True, text=True, timeout=60, check=True).stdout


def _line(who: str) -> str:
  return peer_loss.message(who, HINT) + '\n'


def test_other_lines_pass_unchanged_in_order():
  text = ('a warning\n[Gloo] Rank 1 is connected to 3 peer ranks.\n'
          'Traceback (most recent call last):\n  File "x.py"\n'
          'no newline at the end')
  assert _relayed(text) == text


def test_a_lost_process_becomes_one_line_naming_it():
  before = 'W an earlier warning\n'
  assert _relayed(before + HEARTBEATS_STOPPED) == before + _line(
      'process 1 stopped sending heartbeats')


def test_a_lost_coordinator_becomes_one_line_naming_it():
  assert _relayed(COORDINATOR_GONE) == _line(
      'the coordinator, process 0, cannot be reached')


def test_the_trainers_own_line_is_printed_once():
  own = _line('a collective lost its connection to another process')
  assert _relayed(own + HEARTBEATS_STOPPED) == own


def test_service_lines_without_a_fatal_report_pass_unchanged():
  service = HEARTBEATS_STOPPED[:HEARTBEATS_STOPPED.index('F1204')]
  assert _relayed(service + 'the run goes on\n') == (
      service + 'the run goes on\n')


def test_who_was_lost_in_an_error_of_a_collective():
  error = ('UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/'
           'tcp/pair.cc:538] Read error [127.0.0.1]:30371: Connection reset '
           'by peer')
  assert peer_loss.is_peer_loss(RuntimeError(error))
  assert peer_loss.who_was_lost(error) == (
      'a collective lost its connection to another process')
  assert not peer_loss.is_peer_loss(RuntimeError('RESOURCE_EXHAUSTED: out '
                                                 'of memory'))


def test_held_service_lines_are_passed_on_while_the_run_goes_on():
  """Service lines not followed by a fatal report reach stderr within the
  hold time, before the trainer's stderr closes."""
  service = HEARTBEATS_STOPPED[:HEARTBEATS_STOPPED.index('F1204')]
  relay = subprocess.Popen([sys.executable, peer_loss.__file__, HINT],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    relay.stdin.write(service.encode())
    relay.stdin.flush()
    start = time.monotonic()
    got = b''
    while len(got) < len(service.encode()) and time.monotonic() < start + 20:
      if select.select([relay.stdout], [], [], 1)[0]:
        got += os.read(relay.stdout.fileno(), 65536)
    waited = time.monotonic() - start
    assert got.decode() == service
    assert 2 < waited < 10, waited  # held for _HOLD_SECONDS (3 s)
  finally:
    relay.stdin.close()
    relay.wait(timeout=60)
