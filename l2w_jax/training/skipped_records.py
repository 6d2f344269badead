"""The workdir's record of training records left out as unreadable
(config.dataset.skip_corrupt) by a streaming dataset, which finds them as
it reads: a resumed run leaves the same records out from the start, so
its batches are those of the run that found them.

Each process writes its own file, `skipped_records.<process>.json` (a
process reads only its share of the files), whole each time
(`paths.write_atomic`); every process reads all of them.
"""

from __future__ import annotations

import json

from l2w_jax import paths

PREFIX = 'skipped_records.'


def _path(workdir: str, process_index: int) -> str:
  return paths.join(workdir, f'{PREFIX}{process_index}.json')


def load(workdir: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(tfds ids, descriptions) of the records every process left out so
  far; empty for a new run."""
  if not paths.is_dir(workdir):
    return (), ()
  described = {}
  for name in sorted(paths.listdir(workdir)):
    if name.startswith(PREFIX) and name.endswith('.json'):
      for entry in json.loads(paths.read_text(paths.join(workdir, name))):
        described[entry['id']] = entry['record']
  ids = tuple(sorted(described))
  return ids, tuple(described[i] for i in ids)


class Recorder:
  """Keeps this process's file up to date as its stream leaves records out
  (`data.train_stream`'s `on_skip`)."""

  def __init__(self, workdir: str, process_index: int):
    self._path = _path(workdir, process_index)
    self.entries = []
    if paths.exists(self._path):
      self.entries = json.loads(paths.read_text(self._path))

  def __call__(self, bad, ids) -> None:
    for record, record_id in zip(bad, ids):
      self.entries.append({'id': record_id, 'record': record.describe()})
      # Every process says what it left out (each reads its own files).
      print(f'dataset.skip_corrupt: left out {record.describe()}',
            flush=True)
    paths.write_atomic(self._path, json.dumps(self.entries, indent=1))
