"""An in-memory Google Cloud Storage for tests, behind an HTTPS proxy on
127.0.0.1.

The project's `gs://` code is the one a TPU pod runs, and so are the
clients under it: TensorFlow's GCS filesystem (`tf.io.gfile`, hence
`etils.epath` and TensorBoard), TensorStore's `gcs` driver (orbax's arrays)
and google-cloud-storage (orbax's bucket look-ups). Each talks HTTPS to the
real endpoints (www.googleapis.com, storage.googleapis.com,
oauth2.googleapis.com) with its own default settings; only the network
under them is replaced, the way a TLS-inspecting corporate proxy replaces
it:

* `HTTPS_PROXY` sends every connection here. The proxy answers `CONNECT`
  for those three hosts only (anything else gets 403, so nothing leaves the
  machine), terminates TLS with a certificate of a throw-away CA made for
  the test (`CURL_CA_BUNDLE`, `TENSORSTORE_CA_BUNDLE`, `REQUESTS_CA_BUNDLE`)
  and serves the requests inside the tunnel.
* `GOOGLE_APPLICATION_CREDENTIALS` is an `authorized_user` file (what
  `gcloud auth application-default login` writes): every client trades its
  refresh token for an access token at the token endpoint, here.

What is served is the part of the JSON API (and of the XML API's media
download) those clients use: bucket and storage-layout metadata, object
metadata, ranged media reads, simple, multipart and resumable uploads,
`ifGenerationMatch` / `ifGenerationNotMatch` preconditions, listing with
prefix, delimiter, offsets and pages, rewrite and copy (TensorFlow's rename)
and delete. A request outside it gets 501 and is recorded in `unhandled`.
Objects live in a dict; `objects()` and `put()` let a test look at and
damage them without going through any client. `stop()` writes every answer
(method, host, path, status) to `requests.log` in the given directory, for
whoever reads a failing test.

The serving loop is bounded: it stops on `stop()`, after `max_requests`
requests or at `deadline_seconds`, and a connection closes after
`idle_seconds` without a request.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import pathlib
import re
import ssl
import threading
import time
import urllib.parse
import uuid

TUNNELLED_HOSTS = ('www.googleapis.com', 'storage.googleapis.com',
                   'oauth2.googleapis.com')
# Any token the fake hands out is accepted.
_TOKEN = {'access_token': 'fake-gcs-token', 'expires_in': 3600,
          'token_type': 'Bearer'}


def make_certificates(directory: pathlib.Path) -> tuple[str, str, str]:
  """A throw-away CA and a server certificate for TUNNELLED_HOSTS signed by
  it, written to `directory`: (ca.pem, server.pem, server.key)."""
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
  now = datetime.datetime.now(datetime.timezone.utc)
  valid = dict(not_valid_before=now - datetime.timedelta(hours=1),
               not_valid_after=now + datetime.timedelta(days=2))

  def name(text):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

  ca_key = ec.generate_private_key(ec.SECP256R1())
  ca_name = name('l2w_jax fake GCS test CA')
  ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid['not_valid_before'])
        .not_valid_after(valid['not_valid_after'])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(
            ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256()))
  key = ec.generate_private_key(ec.SECP256R1())
  server = (x509.CertificateBuilder().subject_name(name(TUNNELLED_HOSTS[0]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid['not_valid_before'])
            .not_valid_after(valid['not_valid_after'])
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(h) for h in TUNNELLED_HOSTS]), False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                           True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), False)
            .sign(ca_key, hashes.SHA256()))
  pem = serialization.Encoding.PEM
  paths = (directory / 'ca.pem', directory / 'server.pem',
           directory / 'server.key')
  paths[0].write_bytes(ca.public_bytes(pem))
  paths[1].write_bytes(server.public_bytes(pem))
  paths[2].write_bytes(key.private_bytes(
      pem, serialization.PrivateFormat.PKCS8,
      serialization.NoEncryption()))
  return tuple(str(p) for p in paths)


def _rfc3339(seconds: float) -> str:
  moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
  return moment.strftime('%Y-%m-%dT%H:%M:%S.') + f'{moment.microsecond // 1000:03d}Z'


class _Object:
  __slots__ = ('data', 'generation', 'updated')

  def __init__(self, data: bytes, generation: int):
    self.data = data
    self.generation = generation
    self.updated = time.time()


class FakeGcs:
  """The store and its server. `start()` binds 127.0.0.1 on a free port;
  `env()` is what a process needs to use it; `stop()` shuts it down."""

  def __init__(self, directory: pathlib.Path, buckets=('l2w-test',), *,
               max_requests: int = 200_000, deadline_seconds: float = 1800,
               idle_seconds: float = 60):
    self.buckets = set(buckets)
    self._objects: dict[tuple[str, str], _Object] = {}
    self._uploads: dict[str, dict] = {}
    self._generation = int(time.time() * 1e6)
    self._lock = threading.Lock()
    self.requests: list[tuple[str, str, str]] = []  # (method, host, path)
    self.unhandled: list[str] = []
    # (method, host, path with query, status) of every answer, written to
    # `directory`/requests.log by `stop()` for a failing test's reader.
    self.answers: list[tuple[str, str, str, int]] = []
    self._log = directory / 'requests.log'
    self._max_requests = max_requests
    self._deadline = time.monotonic() + deadline_seconds
    self._idle = idle_seconds
    self._ca, cert, key = make_certificates(directory)
    # The kind of credentials `gcloud auth application-default login`
    # writes: every client trades the refresh token for an access token at
    # the token endpoint (here, this server).
    self._credentials = directory / 'application_default_credentials.json'
    self._credentials.write_text(json.dumps({
        'type': 'authorized_user', 'client_id': 'fake-gcs-client',
        'client_secret': 'fake-gcs-secret', 'refresh_token': 'fake-gcs'}))
    self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    self._tls.load_cert_chain(cert, key)
    self._tls.set_alpn_protocols(['http/1.1'])
    self._stopping = threading.Event()
    self._server = None
    self._thread = None
    self.port = None

  # --------------------------------------------------------------------
  # What a test uses.

  def start(self) -> 'FakeGcs':
    owner = self

    class Handler(_Handler):
      fake = owner
      timeout = owner._idle  # seconds a connection may stay idle

    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self._server.daemon_threads = True
    # Idle keep-alive connections end on their own (`idle_seconds`):
    # closing the server does not wait for them.
    self._server.block_on_close = False
    self._server.timeout = 0.2
    self.port = self._server.server_address[1]
    self._thread = threading.Thread(target=self._serve, name='fake-gcs',
                                    daemon=True)
    self._thread.start()
    return self

  def _serve(self) -> None:
    """The bounded request loop: one accepted connection per turn."""
    while (not self._stopping.is_set() and
           time.monotonic() < self._deadline and
           len(self.requests) < self._max_requests):
      self._server.handle_request()
    self._server.server_close()

  def stop(self) -> None:
    self._stopping.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    self._log.write_text(''.join(f'{m} {h} {p} {s}\n'
                                 for m, h, p, s in self.answers))

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  def env(self) -> dict[str, str]:
    """The environment variables that send every GCS client here."""
    return {
        # The proxy and the CA to trust behind it (TensorFlow's curl,
        # TensorStore's curl, google-cloud-storage's requests).
        'HTTPS_PROXY': self.url, 'https_proxy': self.url,
        'NO_PROXY': '127.0.0.1,localhost', 'no_proxy': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': self._ca, 'TENSORSTORE_CA_BUNDLE': self._ca,
        'REQUESTS_CA_BUNDLE': self._ca,
        # Credentials, and the project google-cloud-storage's client wants.
        'GOOGLE_APPLICATION_CREDENTIALS': str(self._credentials),
        'GOOGLE_CLOUD_PROJECT': 'fake-gcs-project',
        # A refused request fails in seconds instead of 10 retries over
        # minutes.
        'GCS_RETRY_CONFIG_MAX_RETRIES': '2',
        'GCS_RETRY_CONFIG_INIT_DELAY_TIME_US': '100000',
        'GCS_RETRY_CONFIG_MAX_DELAY_TIME_US': '500000',
    }

  def objects(self, bucket: str, prefix: str = '') -> dict[str, bytes]:
    """{name: content} of the objects under `prefix`, as stored."""
    with self._lock:
      return {name: o.data for (b, name), o in sorted(self._objects.items())
              if b == bucket and name.startswith(prefix)}

  def put(self, bucket: str, name: str, data: bytes) -> None:
    """Replaces (or creates) an object, as another writer would."""
    with self._lock:
      self._store(bucket, name, data)

  # --------------------------------------------------------------------
  # The store (callers hold the lock).

  def _store(self, bucket: str, name: str, data: bytes) -> _Object:
    self._generation += 1
    obj = _Object(bytes(data), self._generation)
    self._objects[(bucket, name)] = obj
    return obj

  def _resource(self, bucket: str, name: str, obj: _Object) -> dict:
    return {'kind': 'storage#object', 'id': f'{bucket}/{name}/{obj.generation}',
            'name': name, 'bucket': bucket, 'generation': str(obj.generation),
            'metageneration': '1', 'size': str(len(obj.data)),
            'contentType': 'application/octet-stream',
            'timeCreated': _rfc3339(obj.updated),
            'updated': _rfc3339(obj.updated), 'storageClass': 'STANDARD'}

  def _listing(self, bucket: str, query: dict) -> dict:
    prefix = query.get('prefix', '')
    delimiter = query.get('delimiter', '')
    start, end = query.get('startOffset', ''), query.get('endOffset')
    after = query.get('pageToken', '')
    limit = int(query.get('maxResults', 1000))
    entries = {}  # name -> resource, or None for a prefix
    for (b, name), obj in self._objects.items():
      if b != bucket or not name.startswith(prefix) or name < start or (
          end is not None and name >= end):
        continue
      rest = name[len(prefix):]
      if delimiter and delimiter in rest:
        entries[prefix + rest.split(delimiter, 1)[0] + delimiter] = None
      else:
        entries[name] = self._resource(bucket, name, obj)
    names = [n for n in sorted(entries) if n > after]
    page = names[:limit]
    out = {'kind': 'storage#objects'}
    items = [entries[n] for n in page if entries[n] is not None]
    prefixes = [n for n in page if entries[n] is None]
    if items:
      out['items'] = items
    if prefixes:
      out['prefixes'] = prefixes
    if len(names) > limit:
      out['nextPageToken'] = page[-1]
    return out


def _generation_failed(obj, query) -> int | None:
  """The status a request's generation preconditions give `obj` (None:
  they hold)."""
  current = obj.generation if obj is not None else 0
  if 'ifGenerationMatch' in query and int(query['ifGenerationMatch']) != current:
    return 412
  if ('ifGenerationNotMatch' in query and
      int(query['ifGenerationNotMatch']) == current):
    return 304
  return None


class _Handler(http.server.BaseHTTPRequestHandler):
  """One connection: plain HTTP, or a CONNECT tunnel whose TLS side is
  served by a nested handler on the wrapped socket."""

  protocol_version = 'HTTP/1.1'
  fake: FakeGcs = None
  tunnelled_host = ''

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    del format, args  # quiet: `fake.requests` is the log

  # ------------------------------------------------------------------
  # Plumbing.

  def _body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b';')[0], 16)
        if size == 0:
          while self.rfile.readline() not in (b'\r\n', b'\n', b''):
            pass
          return b''.join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _reply(self, status: int, body: bytes = b'', headers=None,
             content_type='application/json') -> None:
    self.fake.answers.append((self.command, self.tunnelled_host or
                              '127.0.0.1', self.path, status))
    self.send_response(status)
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    if status not in (204, 304):
      self.send_header('Content-Type', content_type)
      self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if body and self.command != 'HEAD' and status not in (204, 304):
      self.wfile.write(body)

  def _json(self, status: int, value, headers=None) -> None:
    self._reply(status, json.dumps(value).encode(), headers)

  def _error(self, status: int, message: str) -> None:
    self._json(status, {'error': {'code': status, 'message': message}})

  def _route(self):
    if self.fake._stopping.is_set():
      self.close_connection = True
    host = self.tunnelled_host or '127.0.0.1'
    parsed = urllib.parse.urlsplit(self.path)
    query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
    self.fake.requests.append((self.command, host, parsed.path))
    body = self._body() if self.command in ('POST', 'PUT') else b''
    try:
      handled = self._dispatch(host, parsed.path, query, body)
    except Exception as e:  # pylint: disable=broad-except
      self.fake.unhandled.append(f'{self.command} {self.path}: {e!r}')
      self._error(500, repr(e))
      return
    if not handled:
      self.fake.unhandled.append(f'{self.command} {host} {self.path}')
      self._error(501, f'fake GCS does not implement {self.command} '
                  f'{self.path}')

  do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _route

  def do_CONNECT(self):  # pylint: disable=invalid-name
    host, _, port = self.path.partition(':')
    self.fake.requests.append(('CONNECT', host, port))
    if host not in TUNNELLED_HOSTS or port != '443':
      # Nothing else may leave through this proxy.
      self.send_error(403, f'fake GCS proxies only {TUNNELLED_HOSTS}')
      return
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.close_connection = True
    try:
      tls = self.fake._tls.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      return  # the client went away (a killed process) or refused us
    tunnel = type(self)
    inner = type('Tunnel', (tunnel,), {'tunnelled_host': host})
    try:
      inner(tls, self.client_address, self.server)
    except (OSError, ssl.SSLError):
      pass  # the client hung up

  # ------------------------------------------------------------------
  # The API.

  def _dispatch(self, host: str, path: str, query: dict, body: bytes) -> bool:
    fake = self.fake
    unquote = urllib.parse.unquote
    if self.command == 'POST' and path in ('/token', '/oauth2/v3/token',
                                           '/oauth2/v4/token'):
      self._json(200, _TOKEN)
      return True
    if host == 'storage.googleapis.com' and not path.startswith(
        ('/storage/', '/upload/')):
      # The XML API's media download: https://storage.googleapis.com/b/o.
      bucket, _, name = path.lstrip('/').partition('/')
      return self._download(bucket, unquote(name), {})
    m = re.fullmatch(r'/upload/storage/v1/b/([^/]+)/o', path)
    if m:
      return self._upload(m.group(1), query, body)
    m = re.fullmatch(r'/storage/v1/b/([^/]+)/o/(.+)/(rewriteTo|copyTo)/b/'
                     r'([^/]+)/o/(.+)', path)
    if m and self.command == 'POST':
      src = (m.group(1), unquote(m.group(2)))
      dst = (m.group(4), unquote(m.group(5)))
      with fake._lock:  # (answers are written with the lock released)
        obj = fake._objects.get(src)
        if obj is not None:
          new = fake._store(*dst, obj.data)
          resource = fake._resource(*dst, new)
      if obj is None:
        self._error(404, f'no object {src}')
      elif m.group(3) == 'copyTo':
        self._json(200, resource)
      else:
        self._json(200, {'kind': 'storage#rewriteResponse', 'done': True,
                         'totalBytesRewritten': str(len(new.data)),
                         'objectSize': str(len(new.data)),
                         'resource': resource})
      return True
    m = re.fullmatch(r'/storage/v1/b/([^/]+)/o/(.+)', path)
    if m:
      bucket, name = m.group(1), unquote(m.group(2))
      if self.command in ('GET', 'HEAD'):
        if query.get('alt') == 'media':
          return self._download(bucket, name, query)
        with fake._lock:
          obj = fake._objects.get((bucket, name))
          if obj is not None:
            failed = _generation_failed(obj, query)
            resource = fake._resource(bucket, name, obj)
        if obj is None:
          self._error(404, f'No such object: {bucket}/{name}')
        elif failed:
          self._reply(failed)
        else:
          self._json(200, resource)
        return True
      if self.command == 'DELETE':
        with fake._lock:
          obj = fake._objects.get((bucket, name))
          failed = obj is not None and _generation_failed(obj, query)
          if obj is not None and not failed:
            del fake._objects[(bucket, name)]
        if obj is None:
          self._error(404, f'No such object: {bucket}/{name}')
        else:
          self._reply(failed or 204)
        return True
      return False
    m = re.fullmatch(r'/storage/v1/b/([^/]+)/o', path)
    if m and self.command == 'GET':
      if m.group(1) not in fake.buckets:
        self._error(404, f'no bucket {m.group(1)}')
        return True
      with fake._lock:
        listing = fake._listing(m.group(1), query)
      self._json(200, listing)
      return True
    m = re.fullmatch(r'/storage/v1/b/([^/]+)(/storageLayout)?', path)
    if m and self.command == 'GET':
      bucket = m.group(1)
      if bucket not in fake.buckets:
        self._error(404, f'The specified bucket does not exist: {bucket}')
      elif m.group(2):
        self._json(200, {'kind': 'storage#storageLayout', 'bucket': bucket,
                         'location': 'US', 'locationType': 'multi-region'})
      else:
        self._json(200, {'kind': 'storage#bucket', 'id': bucket,
                         'name': bucket, 'location': 'US',
                         'storageClass': 'STANDARD', 'metageneration': '1'})
      return True
    return False

  def _download(self, bucket: str, name: str, query: dict) -> bool:
    fake = self.fake
    with fake._lock:
      obj = fake._objects.get((bucket, name))
      failed = _generation_failed(obj, query) if obj is not None else None
    if obj is None:
      self._error(404, f'No such object: {bucket}/{name}')
      return True
    if failed:
      self._reply(failed)
      return True
    data, size = obj.data, len(obj.data)
    headers = {'x-goog-generation': str(obj.generation),
               'x-goog-metageneration': '1',
               'x-goog-stored-content-length': str(size),
               'Last-Modified': self.date_time_string(obj.updated)}
    wanted = self.headers.get('Range', '')
    m = re.fullmatch(r'bytes=(\d*)-(\d*)', wanted.strip())
    if not m:
      self._reply(200, data, headers, 'application/octet-stream')
      return True
    first, last = m.groups()
    if first == '':  # the last N bytes
      first, last = max(0, size - int(last)), size - 1
    else:
      first = int(first)
      last = size - 1 if last == '' else min(int(last), size - 1)
    if first >= size:
      headers['Content-Range'] = f'bytes */{size}'
      self._reply(416, b'', headers)
      return True
    headers['Content-Range'] = f'bytes {first}-{last}/{size}'
    self._reply(206, data[first:last + 1], headers, 'application/octet-stream')
    return True

  def _upload(self, bucket: str, query: dict, body: bytes) -> bool:
    fake = self.fake
    if bucket not in fake.buckets:
      self._error(404, f'The specified bucket does not exist: {bucket}')
      return True
    kind = query.get('uploadType')
    if self.command == 'POST' and kind == 'media':
      return self._finish(bucket, query['name'], query, body)
    if self.command == 'POST' and kind == 'multipart':
      # google-cloud-storage: a JSON part with the name, then the media.
      boundary = self.headers.get_content_type() and self.headers.get_param(
          'boundary')
      parts = body.split(b'--' + boundary.encode())
      meta = json.loads(parts[1].split(b'\r\n\r\n', 1)[1])
      data = parts[2].split(b'\r\n\r\n', 1)[1].rsplit(b'\r\n', 1)[0]
      return self._finish(bucket, query.get('name') or meta['name'], query,
                          data)
    if self.command == 'POST' and kind == 'resumable':
      upload_id = uuid.uuid4().hex
      name = query.get('name') or json.loads(body or b'{}')['name']
      fake._uploads[upload_id] = {'bucket': bucket, 'name': name,
                                  'query': query, 'data': bytearray()}
      root = (f'https://{self.tunnelled_host}' if self.tunnelled_host else
              fake.url)
      location = (f'{root}/upload/storage/v1/b/{bucket}/o?uploadType='
                  f'resumable&upload_id={upload_id}')
      self._reply(200, b'', {'Location': location})
      return True
    if self.command == 'PUT' and kind == 'resumable':
      upload = fake._uploads.get(query.get('upload_id', ''))
      if upload is None:
        self._error(404, 'no such upload session')
        return True
      content_range = self.headers.get('Content-Range', '')
      m = re.fullmatch(r'bytes (\d+)-(\d+)/(\d+|\*)', content_range)
      status = re.fullmatch(r'bytes \*/(\d+|\*)', content_range)
      if m:
        first, total = int(m.group(1)), m.group(3)
        del upload['data'][first:]
        upload['data'] += body
        complete = total != '*' and len(upload['data']) == int(total)
      elif status:  # "how much do you have?"
        total = status.group(1)
        complete = total != '*' and len(upload['data']) == int(total)
      else:  # the whole object in one request (an empty one included)
        upload['data'] = bytearray(body)
        complete = True
      if not complete:
        received = len(upload['data'])
        self._reply(308, b'', {'Range': f'bytes=0-{received - 1}'}
                    if received else {})
        return True
      del fake._uploads[query['upload_id']]
      return self._finish(upload['bucket'], upload['name'], upload['query'],
                          bytes(upload['data']))
    return False

  def _finish(self, bucket: str, name: str, query: dict, data: bytes) -> bool:
    fake = self.fake
    with fake._lock:
      failed = _generation_failed(fake._objects.get((bucket, name)), query)
      if failed is None:
        resource = fake._resource(bucket, name, fake._store(bucket, name,
                                                            data))
    if failed:
      self._error(412, 'At least one of the pre-conditions you specified '
                  'did not hold.')
    else:
      self._json(200, resource)
    return True
