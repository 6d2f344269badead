"""Paths of everything the project writes, reads back or moves: local or gs://.

A workdir (`--workdir`) or an output (`--out`, `--figure`) is a local path
(or a mounted filesystem) or a `gs://bucket/path` URL. Every file of a run
goes through this module or through orbax, which use the same library,
`etils.epath`: checkpoints (orbax, with TensorStore for the arrays), the
bad-checkpoint quarantine, metrics.jsonl, results.json, the figures and the
served-model artifact; TensorBoard's events go through `tf.summary`, which
reads the same URLs. On `gs://` epath uses TensorFlow's GCS filesystem
(`tf.io.gfile`), which is installed with this project, so a TPU pod needs
nothing else: every host reads and writes the same bucket instead of its own
disk.

Local paths behave as `os` and `open` do (epath's local backend is `os`).
A URL is never passed to `os.path.abspath` (which would turn `gs://b/x`
into `<cwd>/gs:/b/x`). `check_writable` refuses, before anything is built,
a scheme that cannot be written (`s3://`, `foo://`, or `gs://` without GCS
support), since epath would otherwise take `foo://x` for the local path
`foo:/x`.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import posixpath
import re
import tempfile
import uuid

from etils import epath

# Schemes whose files epath, TensorStore and orbax all reach.
SUPPORTED_SCHEMES = ('gs',)
_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


class UnsupportedPath(ValueError):
  """A path of a filesystem this code cannot write."""


class NoSpaceError(OSError):
  """A write that failed for lack of room (a full disk or quota, a file-size
  limit): `path` is what was being written, `needed` its bytes."""

  def __init__(self, path, needed: int, why: str):
    super().__init__(f'cannot write {path} ({why}; it needs {megabytes(needed)})')
    self.path, self.needed, self.why = str(path), needed, why


def _raise_if_no_space(error: OSError, path, needed: int) -> None:
  """Raises `error` as a NoSpaceError of `path` (`needed` bytes) if it is
  a write that failed for lack of room."""
  why = out_of_space(error)
  if why is not None and not isinstance(error, NoSpaceError):
    raise NoSpaceError(path, needed, why) from error


def scheme(path) -> str | None:
  """The URL scheme of `path` (`'gs'` for `gs://b/x`), None if local."""
  match = _SCHEME.match(os.fspath(path))
  return match.group(1).lower() if match else None


def is_url(path) -> bool:
  """Whether `path` is a URL (`gs://...`) rather than a local path."""
  return scheme(path) is not None


def _gcs_missing() -> str | None:
  """What `gs://` lacks here (None: nothing). epath reaches GCS through
  TensorFlow's filesystem when TensorFlow is installed (else through gcsfs);
  orbax lists and deletes checkpoint steps on GCS with
  google-cloud-storage."""
  tf_wanted = os.environ.get('EPATH_USE_TF', '').lower() not in (
      'false', 'no', 'f', '0')  # epath's own switch
  if tf_wanted and importlib.util.find_spec('tensorflow') is not None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if 'gs' not in tf.io.gfile.get_registered_schemes():
      return ('a TensorFlow build with its GCS filesystem (this one has '
              'none): pip install tensorflow-cpu (or tensorflow)')
  elif importlib.util.find_spec('gcsfs') is None:
    return 'gcsfs (TensorFlow is not used): pip install gcsfs'
  if importlib.util.find_spec('google.cloud.storage') is None:
    return ('google-cloud-storage, which orbax uses for checkpoints on GCS: '
            'pip install google-cloud-storage')
  return None


def check_writable(path, what: str = 'the path') -> None:
  """Raises UnsupportedPath (one line: the path, the scheme, the way out)
  unless `path` is local or on a filesystem this code can write.

  Args:
    path: a local path or a URL.
    what: how the message names it, e.g. '--workdir'.
  """
  kind = scheme(path)
  if kind is None:
    return
  if kind not in SUPPORTED_SCHEMES:
    raise UnsupportedPath(
        f'{what} {os.fspath(path)}: the {kind}:// scheme cannot be written '
        'by this code (checkpoints go through orbax and TensorStore, the '
        'other files through etils.epath, which reach local paths and gs:// '
        'only): give a local path, a mounted filesystem (e.g. gcsfuse or '
        'NFS) or gs://bucket/path')
  missing = _gcs_missing()
  if missing:
    raise UnsupportedPath(f'{what} {os.fspath(path)}: gs:// needs {missing}')


def as_path(path) -> epath.Path:
  """`path` as an `epath.Path` (what orbax takes)."""
  return epath.Path(os.fspath(path))


def absolute(path) -> str:
  """A local path made absolute (`os.path.abspath`); a URL as it is, less
  trailing slashes (as abspath drops them)."""
  path = os.fspath(path)
  if not is_url(path):
    return os.path.abspath(path)
  stripped = path.rstrip('/')
  return path if stripped.endswith(':') else stripped


def join(base, *parts: str) -> str:
  """`base` / parts: `os.path.join` for local paths, '/' for URLs."""
  base = os.fspath(base)
  return (posixpath.join(base, *parts) if is_url(base) else
          os.path.join(base, *parts))


def split(path) -> tuple[str, str]:
  """(parent, name) of `path` (made absolute if local)."""
  path = absolute(path)
  return posixpath.split(path) if is_url(path) else os.path.split(path)


def exists(path) -> bool:
  """Whether `path` (a file or a directory, local or gs://) exists."""
  return as_path(path).exists()


def lexists(path) -> bool:
  """`exists`, except that a local broken symlink counts as existing."""
  return exists(path) if is_url(path) else os.path.lexists(path)


def is_dir(path) -> bool:
  """Whether `path` is a directory (on GCS: a prefix holding objects)."""
  return as_path(path).is_dir()


def is_file(path) -> bool:
  """Whether `path` exists and is not a directory."""
  return as_path(path).is_file()


def listdir(path) -> list[str]:
  """The names in directory `path` (no trailing '/', whatever the
  backend)."""
  return [child.name for child in as_path(path).iterdir()]


def makedirs(path) -> None:
  """Creates directory `path` and its parents if missing."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def rename(source, target) -> None:
  """Moves `source` (a file or a directory) to `target`, refusing to
  replace an existing `target` where the filesystem can tell. On GCS a
  directory is moved object by object (copy, then delete): every object
  is either at its old or at its new name, none is lost."""
  as_path(source).rename(os.fspath(target))


def move_into(source, directory, name: str) -> str:
  """Moves `source` to `directory`/`name`, creating `directory` if needed;
  returns the new path."""
  makedirs(directory)
  target = join(directory, name)
  rename(source, target)
  return target


def rmtree(path) -> None:
  """Deletes the directory tree `path` (nothing if it does not exist)."""
  if exists(path):
    as_path(path).rmtree()


def getsize(path) -> int:
  """Bytes of the file `path`."""
  return as_path(path).stat().length


def read_text(path) -> str:
  """The content of the file `path`, decoded as UTF-8."""
  return as_path(path).read_text()


def read_bytes(path) -> bytes:
  """The content of the file `path`."""
  return as_path(path).read_bytes()


def write_bytes(path, content: bytes) -> None:
  """Writes `content` to the file `path`; a local file is fsync'ed before
  this returns (so that a rename that publishes it never shows it
  half-written after a crash)."""
  try:
    if is_url(path):
      as_path(path).write_bytes(content)
      return
    with open(path, 'wb') as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    _raise_if_no_space(e, path, len(content))
    raise


def write_atomic(path, content: bytes | str) -> None:
  """Replaces the file `path` by `content` so that a reader (or a crash)
  sees the old file or the new one, never a part.

  Locally: a temporary file next to it, fsync'ed, then `os.replace`. On GCS
  an upload is published only once complete, so the object is written in
  place (a rename there would be a copy and a delete).

  Args:
    path: the file.
    content: bytes, or text (written as UTF-8).
  """
  data = content.encode() if isinstance(content, str) else content
  if is_url(path):
    write_bytes(path, data)
    return
  parent, name = os.path.split(os.path.abspath(path))
  temporary = os.path.join(parent, f'.{name}.{uuid.uuid4().hex}.tmp')
  try:
    write_bytes(temporary, data)
    os.replace(temporary, path)
  except BaseException as e:
    if os.path.exists(temporary):
      os.remove(temporary)
    if isinstance(e, NoSpaceError):
      raise NoSpaceError(path, e.needed, e.why) from e
    raise


def append_text(path, text: str) -> None:
  """Appends `text` to the file `path` (created if missing). On GCS,
  objects cannot grow: TensorFlow's filesystem reads the object and uploads
  it again with `text` added, so each call costs the file's size."""
  try:
    with as_path(path).open('a') as f:
      f.write(text)
  except OSError as e:
    _raise_if_no_space(e, path, len(text.encode()))
    raise


def make_temp_dir(parent, prefix: str, suffix: str) -> str:
  """A new, empty directory in `parent` (created if missing) whose name
  starts with `prefix` and ends with `suffix`; locally readable by all
  (0o755), like a directory made with mkdir."""
  makedirs(parent)
  if is_url(parent):
    path = join(parent, f'{prefix}{uuid.uuid4().hex}{suffix}')
    makedirs(path)
    return path
  path = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
  os.chmod(path, 0o755)  # mkdtemp makes it private
  return path


# Why a write fails for lack of room, by errno and as orbax/TensorStore
# spell it in the messages of the errors they raise instead.
_OUT_OF_SPACE = (
    (errno.ENOSPC, 'No space left on device', 'no space is left on the '
     'device'),
    (errno.EDQUOT, 'Disk quota exceeded', 'the disk quota is exceeded'),
    (errno.EFBIG, 'File too large', 'a file would exceed the size this '
     'process may write (ulimit -f)'),
)


def out_of_space(error: BaseException) -> str | None:
  """Why `error` (or an error it was raised from) is a write that failed
  for lack of room, in words; None if it is not one."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    for number, text, words in _OUT_OF_SPACE:
      if getattr(error, 'errno', None) == number or text in str(error):
        return words
    error = error.__cause__ or error.__context__
  return None


def size_of(path) -> int | None:
  """The bytes of the file or directory tree `path` (local), None for a
  URL or a path that cannot be read."""
  if is_url(path):
    return None
  try:
    if os.path.isfile(path):
      return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)
  except OSError:
    return None


def megabytes(size: int) -> str:
  """`size` bytes in words ("3.2 MB")."""
  return f'{size / 1e6:.1f} MB' if size >= 1e5 else f'{size / 1e3:.0f} kB'

