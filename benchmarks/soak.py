r"""A run killed again and again ends where an uninterrupted one does.

  python -m benchmarks.soak --config=configs/digits.py --workdir=/tmp/l2w_soak \
      --minutes=10 [--seed=0] [--config.train.epochs=16]

Trains `--config` twice with `experiments.main`: once without interruption
(`<workdir>/reference`), and once (`<workdir>/soaked`) while a driver, for
`--minutes` of wall-clock time, waits a random 3 to `--max_wait` seconds
after each start and then sends the process a random one of SIGKILL,
SIGTERM and SIGINT, and starts the same command again once it has exited
(SIGTERM and SIGINT let it save a checkpoint first; SIGKILL does not).
After the budget the last start runs to the end. Prints one JSON line: the
signals sent, the restarts, exits other than the signal's own (a crash
would show there), and whether the two runs' `params_sha256` (in
results.json) are equal. Both runs share the compilation cache, so a
restart costs the imports and loading its programs, not compiling them.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags

_CONFIG = flags.DEFINE_string('config', 'configs/digits.py', 'The config file.')
_WORKDIR = flags.DEFINE_string('workdir', '/tmp/l2w_soak',
                               'Holds reference/ and soaked/ (must not exist).')
_MINUTES = flags.DEFINE_float('minutes', 10.0, 'How long the driver kills.')
_MAX_WAIT = flags.DEFINE_float('max_wait', 45.0,
                               'Longest wait (s) between a start and its '
                               'signal; each wait is uniform from 3 s.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seeds the waits and the signals.')
_OVERRIDES = flags.DEFINE_multi_string(
    'override', ['train.checkpoint_every_steps=5'],
    'Config overrides for both runs, e.g. train.epochs=16 (saving often '
    'lets a killed run keep its progress; it changes no value).')

SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
# What experiments.main exits with after each signal: 0 once SIGTERM or
# SIGINT saved a checkpoint; before its handlers are installed (imports,
# start-up) the signal's own death, or 130 for SIGINT (nothing saved since
# the last checkpoint, as after SIGKILL).
EXPECTED = {signal.SIGKILL: {-signal.SIGKILL},
            signal.SIGTERM: {0, -signal.SIGTERM},
            signal.SIGINT: {0, 130, -signal.SIGINT}}
_SAVE_TIMEOUT_S = 300  # a SIGTERM's save; then it counts as a hang


def _command(workdir: str) -> list[str]:
  return [sys.executable, '-m', 'experiments.main', f'--config={_CONFIG.value}',
          f'--workdir={workdir}',
          *[f'--config.{o}' for o in _OVERRIDES.value]]


def _default_sigint() -> None:
  """In the child: SIGINT's default action, whatever the driver inherited.
  A driver started in the background by a script (`nohup ... &`) ignores
  SIGINT, and so would the run, which then trained on after one (the first
  soaks' 'hangs')."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _hash(workdir: str) -> str | None:
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get('params_sha256')


def _last_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else ''


def _soak(workdir: str, rng: random.Random, budget_s: float) -> dict:
  """Starts, signals and restarts the run in `workdir` for `budget_s`
  seconds, then lets it finish."""
  sent = {s.name: 0 for s in SIGNALS}
  unexpected, hangs, starts = [], 0, 0
  end = time.monotonic() + budget_s
  while _hash(workdir) is None:
    starts += 1
    process = subprocess.Popen(_command(workdir), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_sigint)
    wait = rng.uniform(3.0, _MAX_WAIT.value)
    if time.monotonic() + wait >= end:  # the budget is spent: run to the end
      _, err = process.communicate()
      if process.returncode != 0:
        unexpected.append({'signal': None, 'status': process.returncode,
                           'last_line': _last_line(err)})
        if len(unexpected) > 5:
          break
      continue
    try:
      _, err = process.communicate(timeout=wait)
      finished = True  # it ended (finished, or crashed) before the signal
    except subprocess.TimeoutExpired:
      finished = False
    if finished:
      if process.returncode != 0:
        unexpected.append({'signal': None, 'status': process.returncode,
                           'last_line': _last_line(err)})
      continue
    chosen = rng.choice(SIGNALS)
    process.send_signal(chosen)
    sent[chosen.name] += 1
    try:
      _, err = process.communicate(timeout=_SAVE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      hangs += 1
      process.kill()
      _, err = process.communicate()
    if process.returncode not in EXPECTED[chosen]:
      unexpected.append({'signal': chosen.name, 'status': process.returncode,
                         'last_line': _last_line(err)})
  return {'signals': sent, 'kills_survived': sum(sent.values()),
          'starts': starts, 'hangs': hangs, 'unexpected_exits': unexpected}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if os.path.exists(_WORKDIR.value):
    raise app.UsageError(f'--workdir {_WORKDIR.value} exists: give a new one')
  rng = random.Random(_SEED.value)
  reference = os.path.join(_WORKDIR.value, 'reference')
  soaked = os.path.join(_WORKDIR.value, 'soaked')
  start = time.monotonic()
  run = subprocess.run(_command(reference), capture_output=True, text=True)
  if run.returncode != 0:
    raise app.UsageError(f'the reference run failed: {_last_line(run.stderr)}')
  reference_s = time.monotonic() - start
  start = time.monotonic()
  out = _soak(soaked, rng, 60.0 * _MINUTES.value)
  soak_s = time.monotonic() - start
  with open(os.path.join(reference, 'results.json')) as f:
    iterations = json.load(f)['iterations']
  print(json.dumps({
      **out, 'budget_s': 60.0 * _MINUTES.value, 'soak_s': round(soak_s, 1),
      'reference_s': round(reference_s, 1), 'iterations': iterations,
      'params_sha256_match': _hash(soaked) == _hash(reference),
      'params_sha256': _hash(reference)}), flush=True)


if __name__ == '__main__':
  app.run(main)
