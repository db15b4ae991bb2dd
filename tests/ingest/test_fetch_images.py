"""fetch_images against a real HTTP server on 127.0.0.1: good, resized, slow, 404, HTML,
disguised HTML, truncated, cut-off JPEG and flaky responses; politeness per host; resume."""
import collections
import csv
import http.server
import io
import multiprocessing
import os
import pathlib
import signal
import threading
import time

import pytest
from PIL import Image

from esspr_jax.config.data import fetch_config
from esspr_jax.errors import ConfigError
from esspr_jax.ingest import fetch_images
from esspr_jax.ingest.release_format import FIELDS, read_pairs


def _image(fmt: str, size=(64, 48), color=(200, 30, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, fmt)
  return buf.getvalue()


JPEG = _image("JPEG")
BIG_PNG = _image("PNG", (300, 200), (10, 120, 240))
HTML = b"<html><body>Access denied</body></html>"


class _Server:
  """Serves the test's paths; records requests per path and peak concurrency per Host."""

  def __init__(self, delay: float = 0.0):
    self.hits = collections.Counter()
    self.in_flight = collections.Counter()
    self.peak = collections.Counter()
    self.peak_total = 0
    self.starts = collections.defaultdict(list)
    self.redirects = []       # targets of /to/<n>
    self.delay = delay
    self.hung_up = set()      # paths whose client went away before the headers were sent
    self._lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):
        pass

      def do_GET(self):
        host = self.headers["Host"].split(":")[0]
        with server._lock:
          server.hits[self.path] += 1
          server.starts[host].append(time.monotonic())
          server.in_flight[host] += 1
          server.peak[host] = max(server.peak[host], server.in_flight[host])
          server.peak_total = max(server.peak_total, sum(server.in_flight.values()))
        try:
          server.respond(self)
        except (BrokenPipeError, ConnectionResetError):
          pass
        finally:
          with server._lock:
            server.in_flight[host] -= 1

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.port = self.httpd.server_address[1]
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def url(self, path: str, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{self.port}{path}"

  def respond(self, h):
    path = h.path.split("?")[0]
    if path.startswith("/ok/"):
      time.sleep(self.delay)
      return self._send(h, 200, "image/jpeg", JPEG)
    if path == "/big.png":
      return self._send(h, 200, "image/png", BIG_PNG)
    if path == "/slow.jpg":  # trickles: every read is quick, the whole body never is
      h.send_response(200)
      h.send_header("Content-Type", "image/jpeg")
      h.send_header("Content-Length", str(len(JPEG)))
      h.end_headers()
      for i in range(25):  # 2.5 s for 25 bytes, then it hangs up
        h.wfile.write(JPEG[i:i + 1])
        h.wfile.flush()
        time.sleep(0.1)
      h.close_connection = True
      return None
    if path == "/page.jpg":
      return self._send(h, 200, "text/html; charset=utf-8", HTML)
    if path == "/disguised.jpg":
      return self._send(h, 200, "image/jpeg", HTML)
    if path == "/truncated.jpg":  # promises more bytes than it sends, then hangs up
      h.send_response(200)
      h.send_header("Content-Type", "image/jpeg")
      h.send_header("Content-Length", str(len(JPEG)))
      h.end_headers()
      h.wfile.write(JPEG[:len(JPEG) // 2])
      h.wfile.flush()
      h.close_connection = True
      return None
    if path == "/cut.jpg":  # a consistent response holding half a JPEG
      return self._send(h, 200, "image/jpeg", JPEG[:len(JPEG) // 2])
    if path == "/moved.jpg":
      return self._send(h, 302, "text/plain", b"", {"Location": "/ok/moved.jpg"})
    if path.startswith("/to/"):  # /to/<n>: a redirect to self.redirects[n]
      return self._send(h, 302, "text/plain", b"", {"Location": self.redirects[int(path[4:])]})
    if path == "/loop.jpg":
      return self._send(h, 301, "text/plain", b"", {"Location": "/loop.jpg"})
    if path == "/slow-headers.jpg":  # one header byte a second: each read is quick
      head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
              f"Content-Length: {len(JPEG)}\r\n\r\n").encode()
      for i in range(len(head)):
        try:
          h.wfile.write(head[i:i + 1])
          h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
          self.hung_up.add(path)
          return None
        time.sleep(1.0)
      h.wfile.write(JPEG)
      return None
    if path == "/flaky.jpg" and self.hits[h.path] == 1:
      return self._send(h, 503, "text/plain", b"busy", {"Retry-After": "0"})
    if path == "/flaky.jpg":
      return self._send(h, 200, "image/jpeg", JPEG)
    return self._send(h, 404, "text/plain", b"not found")

  @staticmethod
  def _send(h, status, ctype, body, headers=None):
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
      h.send_header(k, v)
    h.end_headers()
    h.wfile.write(body)

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  s = _Server()
  yield s
  s.close()


def _closed_port() -> int:
  """A local port nothing listens on (bound, then released)."""
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _cfg(**overrides):
  cfg = fetch_config("tiny")
  cfg.connect_timeout_s, cfg.read_timeout_s, cfg.total_timeout_s = 1.0, 1.0, 1.0
  cfg.retries, cfg.backoff_s = 2, 0.01
  cfg.max_side = 64
  cfg.allow_private_hosts = True  # the test server is on 127.0.0.1
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _write_pairs(path: pathlib.Path, pairs: list[tuple[str, str]]) -> pathlib.Path:
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(FIELDS)
    for i, (a, b) in enumerate(pairs):
      w.writerow(["Home", "Mugs", f"t{i}", f"title t{i}", f"r{i}", f"title r{i}", a, b, 1])
  return path


def _manifest(report) -> dict:
  with open(report.manifest, newline="", encoding="utf-8") as f:
    return {r["url"]: r for r in csv.DictReader(f)}


def test_fetch_counts_every_failure_kind_and_rewrites_rows(server, tmp_path):
  u = server.url
  bad = {"timeout": u("/slow.jpg"), "http_error": u("/missing.jpg"),
         "bad_content_type": u("/page.jpg"), "bad_magic": u("/disguised.jpg"),
         "truncated": u("/truncated.jpg"), "undecodable": u("/cut.jpg"),
         "unsupported_url": "javascript:alert(1)",
         "connection_error": f"http://127.0.0.1:{_closed_port()}/x.jpg"}
  good = [u("/ok/1.jpg"), u("/ok/2.jpg"), u("/big.png"), u("/flaky.jpg"), u("/moved.jpg")]
  pairs = [(good[0], good[1]), (good[2], good[3]), (good[0], "local/photo.jpg"),
           (good[1], good[4])]
  pairs += [(good[0], url) for url in bad.values()]
  src = _write_pairs(tmp_path / "release.csv", pairs)
  out, images = tmp_path / "pairs.csv", tmp_path / "images"
  report = fetch_images.fetch_images(src, out, images, _cfg(), verbose=False)
  assert report.urls == len(good) + len(bad)
  assert report.fetched == len(good) and report.already_fetched == 0
  assert report.failed == {reason: 1 for reason in bad}
  assert (report.rows_read, report.rows_written, report.rows_dropped) == (12, 4, 8)
  assert server.hits["/ok/moved.jpg"] == 1  # the redirect was followed
  manifest = _manifest(report)
  for reason, url in bad.items():
    assert manifest[url]["status"] == "failed" and manifest[url]["reason"] == reason
  # Transient kinds were retried (1 + retries attempts); final ones were not.
  assert manifest[bad["truncated"]]["attempts"] == "3"
  assert manifest[bad["http_error"]]["attempts"] == "1"
  assert server.hits["/missing.jpg"] == 1 and server.hits["/page.jpg"] == 1
  assert manifest[u("/flaky.jpg")]["attempts"] == "2"
  rows = list(read_pairs(out))
  assert rows[2].recall_img == "local/photo.jpg"  # a local path passes through
  for r in rows:
    for ref in (r.trigger_img, r.recall_img):
      if ref != "local/photo.jpg":
        with Image.open(images / ref) as img:
          assert img.format == "JPEG" and max(img.size) <= 64
  with Image.open(images / fetch_images.image_file(u("/big.png"))) as img:
    assert img.size == (64, 43)  # 300x200 shrunk to a 64 px long side


def test_per_host_limit_and_interval(tmp_path):
  server = _Server(delay=0.15)
  try:
    urls = [server.url(f"/ok/{i}.jpg", host) for host in ("127.0.0.1", "localhost")
            for i in range(8)]
    src = _write_pairs(tmp_path / "release.csv", list(zip(urls[::2], urls[1::2])))
    report = fetch_images.fetch_images(src, tmp_path / "out.csv", tmp_path / "img",
                                       _cfg(workers=8, per_host=2), verbose=False)
    assert report.fetched == 16
    assert server.peak["127.0.0.1"] == 2 and server.peak["localhost"] == 2
    assert server.peak_total > 2  # the hosts were fetched side by side
    server.starts.clear()
    report = fetch_images.fetch_images(
        src, tmp_path / "out2.csv", tmp_path / "img2",
        _cfg(workers=8, per_host=8, min_host_interval_s=0.05), verbose=False)
    # 8 requests per host, starts >= 0.05 s apart: each host's requests span >= 0.35 s
    # (arrival times jitter, so the span is checked, not each gap).
    spans = [max(t) - min(t) for t in server.starts.values()]
    assert report.fetched == 16 and len(spans) == 2 and min(spans) >= 0.9 * 7 * 0.05
  finally:
    server.close()


def test_rerun_skips_fetched_files(server, tmp_path):
  urls = [server.url(f"/ok/{i}.jpg") for i in range(6)]
  src = _write_pairs(tmp_path / "release.csv", list(zip(urls[::2], urls[1::2])))
  out, images = tmp_path / "pairs.csv", tmp_path / "images"
  first = fetch_images.fetch_images(src, out, images, _cfg(), verbose=False)
  assert first.fetched == 6
  first_rows = list(read_pairs(out))
  (images / fetch_images.image_file(urls[0])).unlink()
  hits = dict(server.hits)
  again = fetch_images.fetch_images(src, out, images, _cfg(), verbose=False)
  assert (again.fetched, again.already_fetched) == (1, 5)
  assert {p: n - hits.get(p, 0) for p, n in server.hits.items() if n != hits.get(p, 0)} == {
      "/ok/0.jpg": 1}
  assert list(read_pairs(out)) == first_rows and len(first_rows) == 3


def test_killed_run_leaves_only_whole_images_and_a_rerun_finishes(tmp_path):
  server = _Server(delay=0.2)
  try:
    urls = [server.url(f"/ok/{i}.jpg") for i in range(24)]
    src = _write_pairs(tmp_path / "release.csv", list(zip(urls[::2], urls[1::2])))
    out, images = tmp_path / "pairs.csv", tmp_path / "images"
    # A forked child runs the fetch (no interpreter start-up); SIGKILL it mid-way.
    proc = multiprocessing.get_context("fork").Process(
        target=fetch_images.fetch_images, args=(src, out, images, _cfg(workers=2)),
        kwargs={"verbose": False})
    proc.start()
    deadline = time.monotonic() + 60
    while len(list(images.glob("*/*.jpg"))) < 4 and time.monotonic() < deadline:
      time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    done = list(images.glob("*/*.jpg"))
    assert 4 <= len(done) < 24 and not out.exists()
    for path in done:  # whatever has its final name is a whole image
      with Image.open(path) as img:
        img.load()
    report = fetch_images.fetch_images(src, out, images, _cfg(), verbose=False)
    assert report.already_fetched == len(done) and report.fetched == 24 - len(done)
    assert report.rows_written == 12
  finally:
    server.close()


def test_bad_fetch_config_names_the_key(tmp_path):
  src = _write_pairs(tmp_path / "release.csv", [])
  with pytest.raises(ConfigError, match="data.fetch.per_host"):
    fetch_images.fetch_images(src, tmp_path / "o.csv", tmp_path / "i", _cfg(per_host=0))
  cfg = _cfg()
  with cfg.ignore_type():
    cfg.allow_private_hosts = "yes"
  with pytest.raises(ConfigError, match="data.fetch.allow_private_hosts"):
    fetch_images.fetch_images(src, tmp_path / "o.csv", tmp_path / "i", cfg)
  assert fetch_config("demo").allow_private_hosts is False


def test_private_hosts_are_refused_before_connecting_unless_allowed(server, tmp_path):
  """A third party's URL list must not make the fetcher read local services: loopback
  (by name, IPv4, IPv6, 0.0.0.0, IPv4-mapped IPv6) is refused without a request."""
  port = server.port
  urls = [server.url("/ok/1.jpg"), server.url("/ok/2.jpg", "localhost"),
          f"http://[::1]:{port}/ok/3.jpg", f"http://0.0.0.0:{port}/ok/4.jpg",
          f"http://[::ffff:127.0.0.1]:{port}/ok/5.jpg", server.url("/moved.jpg")]
  src = _write_pairs(tmp_path / "release.csv", list(zip(urls[::2], urls[1::2])))
  report = fetch_images.fetch_images(src, tmp_path / "out.csv", tmp_path / "img",
                                     _cfg(allow_private_hosts=False), verbose=False)
  assert report.failed == {"blocked_host": len(urls)} and report.fetched == 0
  assert not server.hits  # not one request reached the server
  detail = _manifest(report)[urls[0]]["detail"]
  assert "127.0.0.1" in detail and "data.fetch.allow_private_hosts" in detail


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("127.9.9.9", False),
    ("::1", False), ("0.0.0.0", False), ("169.254.169.254", False), ("fe80::1", False),
    ("fe80::1%2", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False),
    ("fc00::1", False), ("100.64.0.1", False), ("224.0.0.1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True)])
def test_which_addresses_count_as_private(address, public):
  assert fetch_images.is_public_address(address) is public


def test_redirects_are_followed_hop_by_hop_through_each_hosts_gate(tmp_path):
  """Each hop is its own request: through its host's politeness gate, and refused
  (blocked_redirect) when it leaves http(s); a loop ends as http_error."""
  server = _Server(delay=0.1)
  try:
    server.redirects = [server.url(f"/ok/r{i}.jpg", "localhost") for i in range(4)]
    server.redirects += ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", "gopher://x/y"]
    via = [server.url(f"/to/{i}") for i in range(4)]
    direct = [server.url(f"/ok/d{i}.jpg", "localhost") for i in range(4)]
    blocked = [server.url(f"/to/{i}") for i in range(4, 7)]
    loop = server.url("/loop.jpg")
    pairs = list(zip(via, direct)) + [(direct[0], u) for u in blocked + [loop]]
    src = _write_pairs(tmp_path / "release.csv", pairs)
    report = fetch_images.fetch_images(src, tmp_path / "out.csv", tmp_path / "img",
                                       _cfg(workers=8, per_host=1), verbose=False)
    assert report.fetched == 8
    assert report.failed == {"blocked_redirect": 3, "http_error": 1}
    # The redirected requests went through localhost's gate with the direct ones.
    assert server.peak["localhost"] == 1 and len(server.starts["localhost"]) == 8
    manifest = _manifest(report)
    assert "file:///etc/passwd" in manifest[blocked[0]]["detail"]
    assert "redirects" in manifest[loop]["detail"]
    assert server.hits["/loop.jpg"] == 6  # the first request and 5 redirects
  finally:
    server.close()


def test_a_server_trickling_its_headers_is_cut_at_the_deadline(server, tmp_path):
  """One header byte a second never trips the per-read timeout; the whole-request
  deadline (total_timeout_s) ends it, counted as a timeout."""
  url = server.url("/slow-headers.jpg")
  src = _write_pairs(tmp_path / "release.csv", [(server.url("/ok/1.jpg"), url)])
  report = fetch_images.fetch_images(
      src, tmp_path / "out.csv", tmp_path / "img",
      _cfg(read_timeout_s=5.0, total_timeout_s=2.0, retries=0), verbose=False)
  assert report.failed == {"timeout": 1} and report.fetched == 1
  assert "total_timeout_s" in _manifest(report)[url]["detail"]
  deadline = time.monotonic() + 30  # the server notices at its next byte
  while "/slow-headers.jpg" not in server.hung_up and time.monotonic() < deadline:
    time.sleep(0.1)
  assert "/slow-headers.jpg" in server.hung_up  # we hung up before the headers were done


def test_a_malformed_url_is_counted_and_the_rest_fetched(server, tmp_path):
  bad = ["http://[::1/x.jpg", "http://127.0.0.1:99999/x.jpg", "http:///x.jpg",
         "http://exa mple.com/x.jpg"]
  good = server.url("/ok/1.jpg")
  src = _write_pairs(tmp_path / "release.csv", [(good, u) for u in bad] + [(good, good)])
  report = fetch_images.fetch_images(src, tmp_path / "out.csv", tmp_path / "img", _cfg(),
                                     verbose=False)
  assert report.failed == {"bad_url": len(bad)} and report.fetched == 1
  assert (report.rows_written, report.rows_dropped) == (1, len(bad))
  assert not server.hits.keys() - {"/ok/1.jpg"}
