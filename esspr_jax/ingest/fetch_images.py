"""Fetch the images of release-format pairs whose image fields are URLs.

The released eSSPR rows name their images by URL. This stage downloads each distinct URL
once, checks it is an image (Content-Type, then magic bytes, then a full decode),
shrinks it to `max_side` and stores it as JPEG under IMAGE_DIR/ab/<sha256 of url>.jpg.
It writes OUT: the pairs whose two images were fetched, image fields rewritten to those
relative paths (so `--mode=build --train_pairs=OUT --image_dir=IMAGE_DIR` works), and
OUT.fetch_manifest.csv: one line per URL with its status and, for a failure, why.

- Concurrency: `workers` threads; politeness: at most `per_host` requests in flight to
  one host and `min_host_interval_s` between request starts to it.
- Retries with exponential backoff for transient failures only (timeouts, connection
  errors, truncated bodies, 429 and 5xx, honouring Retry-After up to `max_backoff_s`); a
  404 or an HTML page is final. Each request has connect/read timeouts and a deadline
  (`total_timeout_s`) for all of it, headers and body: when it passes, a watchdog shuts
  the socket down, so a server that trickles bytes cannot hold a worker forever.
- Redirects (at most MAX_REDIRECTS) are followed by hand, each hop a request of its own
  through its host's politeness gate. A URL list comes from a third party: unless
  `allow_private_hosts`, a host is resolved before connecting and refused when any of
  its addresses is not public (loopback, link-local, private, ...; see
  is_public_address), the connection then made to the checked address. Refusals count
  as `blocked_host` (a listed URL) or `blocked_redirect` (a hop, also any hop that leaves
  http(s)). A URL that does not parse is `bad_url`.
- Resumable: every image is written atomically (temp file + rename), so after a kill a
  file under its final name is whole; a rerun skips URLs whose file exists.

HTTP is urllib3 (already a dependency through requests/Beam): pooled keep-alive
connections per host, explicit connect/read timeouts, and streamed bodies we can cut off
at a byte limit; retries and redirects are ours, so they cover the body as well as the
headers. Its connection classes are subclassed (_Guarded) for the address check and the
deadline. Pillow decodes and resizes.

CLI:
  python -m esspr_jax.ingest.fetch_images --config=configs/demo.py --pairs=RELEASE.csv \\
      --out=PAIRS.csv --image_dir=IMAGES [--config.data.fetch.workers=32]
"""
import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import ipaddress
import pathlib
import socket
import sys
import threading
import time
import urllib.parse
import warnings

import urllib3
from absl import flags
from ml_collections import config_flags
from PIL import Image

from esspr_jax.atomic_io import atomic_open
from esspr_jax.config.data import validate_fetch
from esspr_jax.errors import DataError
from esspr_jax.ingest import pair_files
from esspr_jax.ingest.release_format import FIELDS, PairRow
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.input.images import to_rgb

MANIFEST_FIELDS = ("url", "status", "reason", "detail", "file", "attempts", "bytes")
# Failure reasons, final unless in TRANSIENT.
REASONS = ("unsupported_url", "bad_url", "blocked_host", "blocked_redirect", "timeout",
           "connection_error", "truncated", "too_large", "http_error", "bad_content_type",
           "bad_magic", "undecodable", "too_small")
TRANSIENT = frozenset({"timeout", "connection_error", "truncated", "http_retry"})
_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"),
          (b"GIF89a", "gif"), (b"BM", "bmp"))
_SIDES = ("trigger", "recall")
MAX_REDIRECTS = 5
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})


class FetchFailure(Exception):
  def __init__(self, reason: str, detail: str = "", retry_after: float | None = None):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail, self.retry_after = reason, detail, retry_after


@dataclasses.dataclass
class Outcome:
  url: str
  status: str          # fetched | already_fetched | failed
  reason: str = ""
  detail: str = ""
  file: str = ""       # relative to the image dir
  attempts: int = 0
  bytes: int = 0


@dataclasses.dataclass
class FetchReport:
  urls: int
  fetched: int
  already_fetched: int
  failed: dict          # reason -> count
  rows_read: int
  rows_written: int
  rows_dropped: int     # a row is dropped when either of its images failed
  seconds: float
  out: str
  manifest: str

  def table(self) -> str:
    lines = [f"{'image urls':<26}{self.urls:>10,}", f"{'  fetched':<26}{self.fetched:>10,}",
             f"{'  already fetched':<26}{self.already_fetched:>10,}",
             f"{'  failed':<26}{sum(self.failed.values()):>10,}"]
    lines += [f"{'    ' + r:<26}{n:>10,}" for r, n in sorted(self.failed.items())]
    lines += [f"{'rows read':<26}{self.rows_read:>10,}",
              f"{'rows written':<26}{self.rows_written:>10,}",
              f"{'rows dropped':<26}{self.rows_dropped:>10,}",
              f"wrote {self.out} and {self.manifest} in {self.seconds:.1f}s"]
    return "\n".join(lines)


def image_file(url: str) -> str:
  """Where a URL's image is stored, relative to the image dir: ab/abcdef....jpg."""
  digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
  return f"{digest[:2]}/{digest}.jpg"


def is_url(ref: str) -> bool:
  return "://" in ref or ref.lower().startswith(("javascript:", "data:"))


def sniff(data: bytes) -> str | None:
  """The image format its first bytes say, or None."""
  for magic, fmt in _MAGIC:
    if data.startswith(magic):
      return fmt
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  return None


def to_jpeg(data: bytes, max_side: int, min_side: int, quality: int) -> bytes:
  """Decodes every pixel, shrinks the long side to max_side (0 = keep), re-encodes RGB
  JPEG. Raises FetchFailure(undecodable | too_small | too_large)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      if max_side:
        img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
      img.load()
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise FetchFailure("too_large", str(e)) from None
  except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
    raise FetchFailure("undecodable", str(e)) from None
  if min(img.size) < min_side:
    raise FetchFailure("too_small", f"{img.size[0]}x{img.size[1]}")
  img = to_rgb(img)
  if max_side and max(img.size) > max_side:
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  buf = io.BytesIO()
  img.save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def is_public_address(address: str) -> bool:
  """Whether an IP address is globally routable. Loopback, link-local (169.254/16,
  fe80::/10), private, shared (100.64/10), unspecified, reserved and multicast addresses
  are not; an IPv4-mapped IPv6 address is judged by its IPv4 address."""
  ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone (fe80::1%eth0)
  if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
    ip = ip.ipv4_mapped
  return ip.is_global and not ip.is_multicast


class _Blocked(Exception):
  """A host that resolves to a non-public address; passes through urllib3 untouched."""


class _Request:
  """One HTTP request's guard, found by the connection through a thread-local: whether it
  may reach private addresses, and its deadline. When the deadline passes, the socket is
  shut down, waking a read that a trickling server keeps alive (headers or body)."""

  _current = threading.local()

  def __init__(self, seconds: float, allow_private: bool):
    self.allow_private = allow_private
    self.expired = False
    self._conn = None
    self._lock = threading.Lock()
    self._timer = threading.Timer(seconds, self._expire)
    self._timer.daemon = True

  @classmethod
  def current(cls) -> "_Request | None":
    return getattr(cls._current, "request", None)

  def __enter__(self):
    _Request._current.request = self
    self._timer.start()
    return self

  def __exit__(self, *exc):
    self._timer.cancel()
    with self._lock:
      self._conn = None
    _Request._current.request = None

  def watch(self, conn) -> None:
    """The connection this request runs on (cut at once if the deadline has passed)."""
    with self._lock:
      self._conn = conn
      if self.expired:
        _shut(conn.sock)

  def _expire(self) -> None:
    with self._lock:
      self.expired = True
      if self._conn is not None:
        _shut(self._conn.sock)


def _shut(sock) -> None:
  if sock is not None:
    try:  # the plain socket's shutdown: wakes a blocked read, TLS or not
      socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
      pass


class _Guarded:
  """Mixin for urllib3's connection classes: applies the current _Request's address check
  on connect (overriding urllib3's `_new_conn`, pinned urllib3 2.8) and its deadline."""

  def _new_conn(self):
    request = _Request.current()
    if request is None:
      return super()._new_conn()
    request.watch(self)
    if request.allow_private:
      sock = super()._new_conn()
    else:
      sock = self._connect_public()
    if request.expired:
      _shut(sock)
    return sock

  def _connect_public(self):
    """Resolves the host, refuses it if any address is not public, then connects to the
    checked addresses themselves (no second lookup a rebinding DNS could answer)."""
    name = self._dns_host
    try:
      infos = socket.getaddrinfo(name, self.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
      raise urllib3.exceptions.NameResolutionError(self.host, self, e) from e
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    private = [a for a in addresses if not is_public_address(a)]
    if private:
      raise _Blocked(f"{self.host} is {private[0]}, not a public address (set "
                     "data.fetch.allow_private_hosts to fetch from it)")
    error = None
    for address in addresses:
      self._dns_host = address
      try:
        return super()._new_conn()
      except urllib3.exceptions.ConnectTimeoutError as e:  # NewConnectionError too
        error = e
      finally:
        self._dns_host = name
    raise error

  def request(self, *args, **kwargs):
    request = _Request.current()
    if request is not None:
      request.watch(self)  # a pooled connection is reused without a new connect
    return super().request(*args, **kwargs)


class _HTTPConnection(_Guarded, urllib3.connection.HTTPConnection):
  pass


class _HTTPSConnection(_Guarded, urllib3.connection.HTTPSConnection):
  pass


class _HTTPPool(urllib3.HTTPConnectionPool):
  ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
  ConnectionCls = _HTTPSConnection


def _parse(url: str) -> urllib.parse.SplitResult:
  """The parts of an http(s) URL; FetchFailure(bad_url) when it does not parse."""
  try:
    parts = urllib.parse.urlsplit(url)
    parts.port  # noqa: B018  # raises ValueError for a port out of range
  except ValueError as e:
    raise FetchFailure("bad_url", f"{url}: {e}") from None
  if not parts.hostname:
    raise FetchFailure("bad_url", f"{url}: no host")
  return parts


class HostGate:
  """Per-host politeness: at most `per_host` requests in flight to a host, and request
  starts to one host at least `interval` seconds apart."""

  def __init__(self, per_host: int, interval: float):
    self._per_host, self._interval = per_host, interval
    self._lock = threading.Lock()
    self._slots: dict[str, threading.Semaphore] = {}
    self._next_start: dict[str, float] = collections.defaultdict(float)

  def _slot(self, host: str) -> threading.Semaphore:
    with self._lock:
      if host not in self._slots:
        self._slots[host] = threading.BoundedSemaphore(self._per_host)
      return self._slots[host]

  def __call__(self, host: str):
    gate = self

    class _Held:
      def __enter__(self):
        gate._slot(host).acquire()
        with gate._lock:
          now = time.monotonic()
          start = max(now, gate._next_start[host])
          gate._next_start[host] = start + gate._interval
        if start > now:
          time.sleep(start - now)

      def __exit__(self, *exc):
        gate._slot(host).release()
    return _Held()


class Fetcher:
  """Downloads and validates one URL at a time per thread (see module doc)."""

  def __init__(self, cfg):
    self.cfg = cfg
    # urllib3 retries nothing and follows no redirect itself: fetch() retries (body
    # included) and _download follows redirects, each hop checked and gated.
    self._http = urllib3.PoolManager(
        maxsize=int(cfg.per_host), retries=urllib3.Retry(False),
        timeout=urllib3.Timeout(connect=float(cfg.connect_timeout_s),
                                read=float(cfg.read_timeout_s)),
        headers={"User-Agent": cfg.user_agent, "Accept": "image/*"})
    self._http.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    self._gate = HostGate(int(cfg.per_host), float(cfg.min_host_interval_s))

  def _download(self, url: str) -> bytes:
    """One attempt: the body of a 200 image/* response, redirects followed hop by hop."""
    for hop in range(MAX_REDIRECTS + 1):
      result = self._request(url, hop)
      if isinstance(result, bytes):
        return result
      url = result
    raise FetchFailure("http_error", f"more than {MAX_REDIRECTS} redirects")

  def _request(self, url: str, hop: int) -> bytes | str:
    """One request within the byte and time limits: the body, or where it redirects to."""
    cfg = self.cfg
    with self._gate(_parse(url).netloc.lower()), _Request(
        float(cfg.total_timeout_s), bool(cfg.allow_private_hosts)) as request:
      late = FetchFailure("timeout", f"request not done in total_timeout_s={cfg.total_timeout_s}")
      try:
        resp = self._http.request("GET", url, preload_content=False, redirect=False)
      except _Blocked as e:
        raise FetchFailure("blocked_redirect" if hop else "blocked_host", str(e)) from None
      except urllib3.exceptions.LocationValueError as e:  # a host urllib3 cannot parse
        raise FetchFailure("bad_url", f"{url}: {e}") from None
      except urllib3.exceptions.HTTPError as e:
        if request.expired:
          raise late from None
        reason = e.reason if isinstance(e, urllib3.exceptions.MaxRetryError) else e
        # NewConnectionError (refused, unresolvable) subclasses ConnectTimeoutError.
        if isinstance(reason, urllib3.exceptions.TimeoutError) and not isinstance(
            reason, urllib3.exceptions.NewConnectionError):
          raise FetchFailure("timeout", str(reason)) from None
        raise FetchFailure("connection_error", str(reason)) from None
      whole = False
      try:
        if resp.status in _REDIRECT_STATUS and resp.headers.get("Location"):
          return self._redirect_target(url, resp.headers["Location"])
        if resp.status != 200:
          retry_after = _retry_after(resp.headers.get("Retry-After"))
          if resp.status == 429 or resp.status >= 500:
            raise FetchFailure("http_retry", f"HTTP {resp.status}", retry_after)
          raise FetchFailure("http_error", f"HTTP {resp.status}")
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith("image/"):
          raise FetchFailure("bad_content_type", ctype)
        length = resp.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > int(cfg.max_bytes):
          raise FetchFailure("too_large", f"Content-Length {length} > max_bytes")
        body = bytearray()
        try:
          while chunk := resp.read1(64 * 1024):
            body += chunk
            if len(body) > int(cfg.max_bytes):
              raise FetchFailure("too_large", f"more than max_bytes={cfg.max_bytes}")
        except urllib3.exceptions.ProtocolError as e:  # IncompleteRead: short body
          raise late if request.expired else FetchFailure("truncated", str(e)) from None
        except urllib3.exceptions.TimeoutError as e:
          raise late if request.expired else FetchFailure("timeout", str(e)) from None
        if request.expired:  # cut off with no Content-Length to show it
          raise late
        whole = True
        return bytes(body)
      finally:
        if not whole:  # unread bytes would corrupt the next response on this connection
          resp.close()
        resp.release_conn()

  @staticmethod
  def _redirect_target(url: str, location: str) -> str:
    """The absolute URL a redirect leads to; FetchFailure(blocked_redirect) off http(s)."""
    try:
      target = urllib.parse.urljoin(url, location)
    except ValueError as e:
      raise FetchFailure("bad_url", f"redirect to {location!r}: {e}") from None
    if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
      raise FetchFailure("blocked_redirect", f"redirect to {target} (only http(s) is followed)")
    return target

  def fetch(self, url: str, image_dir: pathlib.Path) -> Outcome:
    cfg = self.cfg
    rel = image_file(url)
    target = image_dir / rel
    if target.is_file() and target.stat().st_size > 0:
      return Outcome(url, "already_fetched", file=rel, bytes=target.stat().st_size)
    if url.split(":")[0].lower() not in ("http", "https"):
      return Outcome(url, "failed", "unsupported_url", url.split(":")[0] + ":")
    try:
      _parse(url)
    except FetchFailure as e:
      return Outcome(url, "failed", e.reason, e.detail)
    attempts, failure = 0, None
    while attempts <= int(cfg.retries):
      attempts += 1
      try:
        data = self._download(url)
        fmt = sniff(data)
        if fmt is None:
          raise FetchFailure("bad_magic", repr(data[:16]))
        jpeg = to_jpeg(data, int(cfg.max_side), int(cfg.min_side), int(cfg.jpeg_quality))
        with atomic_open(target, "wb") as f:
          f.write(jpeg)
        return Outcome(url, "fetched", file=rel, attempts=attempts, bytes=len(jpeg))
      except FetchFailure as e:
        failure = e
        if e.reason not in TRANSIENT or attempts > int(cfg.retries):
          break
        backoff = float(cfg.backoff_s) * 2 ** (attempts - 1)
        if e.retry_after is not None:
          backoff = max(backoff, e.retry_after)
        time.sleep(min(backoff, float(cfg.max_backoff_s)))
    reason = "http_error" if failure.reason == "http_retry" else failure.reason
    return Outcome(url, "failed", reason, failure.detail, attempts=attempts)


def _retry_after(value: str | None) -> float | None:
  try:
    return max(0.0, float(value)) if value else None
  except ValueError:
    return None  # an HTTP date: fall back to our own backoff


def fetch_images(pairs, out, image_dir, cfg, verbose: bool = True) -> FetchReport:
  """Fetches every image URL of `pairs` (a file, glob or mining shards) into image_dir,
  writes OUT (pairs with local image paths) and OUT.fetch_manifest.csv (module doc)."""
  validate_fetch(cfg)
  start = time.perf_counter()
  image_dir, out = pathlib.Path(image_dir), pathlib.Path(out)
  image_dir.mkdir(parents=True, exist_ok=True)
  skips = SkipCounter(f"pairs {pairs}")
  rows = list(pair_files.read_pairs(pairs, skips))
  urls = list(dict.fromkeys(getattr(r, f"{side}_img") for r in rows for side in _SIDES
                            if is_url(getattr(r, f"{side}_img"))))
  fetcher = Fetcher(cfg)
  with concurrent.futures.ThreadPoolExecutor(max_workers=int(cfg.workers)) as pool:
    outcomes = {o.url: o for o in pool.map(lambda u: fetcher.fetch(u, image_dir), urls)}
  kept, dropped = [], 0
  for r in rows:
    local = {}
    for side in _SIDES:
      ref = getattr(r, f"{side}_img")
      o = outcomes.get(ref)
      local[f"{side}_img"] = ref if o is None else (o.file if o.status != "failed" else None)
    if None in local.values():
      dropped += 1
      continue
    kept.append(dataclasses.replace(r, **local))
  _write_pairs(out, kept)
  manifest = manifest_path(out)
  with atomic_open(manifest, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(MANIFEST_FIELDS)
    for o in outcomes.values():
      w.writerow([getattr(o, k) for k in MANIFEST_FIELDS])
  status = collections.Counter(o.status for o in outcomes.values())
  report = FetchReport(
      urls=len(urls), fetched=status["fetched"], already_fetched=status["already_fetched"],
      failed=dict(collections.Counter(o.reason for o in outcomes.values()
                                      if o.status == "failed")),
      rows_read=len(rows), rows_written=len(kept), rows_dropped=dropped,
      seconds=time.perf_counter() - start, out=str(out), manifest=str(manifest))
  if verbose:
    print(report.table())
  return report


def manifest_path(out) -> pathlib.Path:
  out = str(out)
  return pathlib.Path((out.removesuffix(".csv")) + ".fetch_manifest.csv")


def _write_pairs(path: pathlib.Path, rows: list[PairRow]) -> None:
  with atomic_open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(FIELDS)
    for r in rows:
      w.writerow([getattr(r, k) for k in FIELDS])


def fetch_from_config(config, pairs, out, image_dir) -> FetchReport:
  """The `--mode=fetch-images` stage: fetch_images with `config.data.fetch`."""
  if not (pairs and out and image_dir):
    raise DataError("--mode=fetch-images needs --pairs (or --train_pairs), --out and "
                    "--image_dir")
  return fetch_images(pairs, out, image_dir, config.data.fetch)


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", "configs/demo.py", "run config file",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("pairs", None, "release-format pairs with image URLs (file or glob)",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "output pairs CSV with local image paths", flag_values=fv)
  flags.DEFINE_string("image_dir", None, "where fetched images are stored", flag_values=fv)
  fv(argv)
  try:
    fetch_from_config(fv.config, fv.pairs, fv.out, fv.image_dir)
  except DataError as e:  # bad input: one line and exit 2, as the other stages
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  from esspr_jax.ingest import fetch_images as _fetch_images  # noqa: PLW0406  # pylint: disable=import-self
  _fetch_images.main()
