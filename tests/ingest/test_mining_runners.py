"""Mining as a remote runner sees it: the CLI under multi_processing workers (pickled
graph), the sockets a local run listens on, split reads, sharded output read back by
glob (pair_files, the TFDS builder) and the title-overlap constraint.

Listening sockets are read from /proc (a process's fds -> socket inodes -> the LISTEN
rows of /proc/net/tcp{,6}), so the check needs Linux and nothing else."""
import ipaddress
import os
import pathlib
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io import source_test_utils

from esspr_jax.config.data import mining_config, world_config
from esspr_jax.demo_world import synthetic
from esspr_jax.errors import DataError
from esspr_jax.ingest import clicklog_source, mining, mining_graph, pair_files
from esspr_jax.ingest.release_format import read_pairs as read_one_file
from support import socket_inodes

REPO = pathlib.Path(__file__).resolve().parents[2]
linux_proc = pytest.mark.skipif(not os.path.exists("/proc/net/tcp6"),
                                reason="reads listening sockets from Linux /proc")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  cfg = world_config("tiny")
  cfg.image_size = 16
  return synthetic.generate_world(cfg, tmp_path_factory.mktemp("world"))


def _rows(spec) -> set:
  """Every pair's fields, image paths resolved (they are relative to the pair file)."""
  base = pair_files.expand(spec)[0].parent
  return {(r.trigger_id, r.recall_id, r.trigger_title, r.recall_title,
           os.path.normpath(base / r.trigger_img), os.path.normpath(base / r.recall_img),
           r.cate_name) for r in pair_files.read_pairs(spec)}


def _parent(pid: str) -> int:
  with open(f"/proc/{pid}/stat") as f:
    return int(f.read().rsplit(")", 1)[1].split()[1])


def _tree(root: int) -> list[int]:
  """root and all its descendants, from /proc/*/stat parent ids."""
  parents = {}
  for name in os.listdir("/proc"):
    if name.isdigit():
      try:
        parents[int(name)] = _parent(name)
      except (OSError, ValueError, IndexError):
        continue
  tree, frontier = [root], [root]
  while frontier:
    frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
    tree += frontier
  return tree



def _hex_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
  raw = bytes.fromhex(text)  # 32-bit words in host (little-endian) order
  raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
  return ipaddress.ip_address(raw)


def _listen_sockets() -> dict:
  """inode -> local address of every TCP socket in LISTEN state (/proc/net/tcp{,6})."""
  out = {}
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
      for line in f.readlines()[1:]:
        fields = line.split()
        if fields[3] == "0A":  # TCP_LISTEN
          out[fields[9]] = _hex_ip(fields[1].split(":")[0])
  return out


def _sample(pids: list[int], listening: set) -> None:
  """Adds the listen addresses of the sockets `pids` hold to `listening`."""
  inodes = set().union(*(socket_inodes(p) for p in pids))
  listening.update(ip for inode, ip in _listen_sockets().items() if inode in inodes)


def _sdk_workers(pids: list[int]) -> int:
  """How many of `pids` are Python processes running a Beam SDK worker."""
  n = 0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode(errors="replace").split("\0")
    except OSError:
      continue
    n += "python" in os.path.basename(argv[0]) and "sdk_worker_main" in " ".join(argv)
  return n


def _run_watching_sockets(args: list, cwd: pathlib.Path) -> tuple[set, int]:
  """Runs a command; returns every TCP listen address its process tree held while it
  ran, and the most Beam SDK worker processes seen at once."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  listening, workers = set(), 0
  drain = threading.Thread(target=lambda: setattr(proc, "log", proc.stdout.read()))
  drain.start()  # never let a full pipe stall the run
  while proc.poll() is None:
    pids = _tree(proc.pid)
    _sample(pids, listening)
    workers = max(workers, _sdk_workers(pids))
    time.sleep(0.1)
  drain.join()
  assert proc.returncode == 0, proc.log.decode(errors="replace")[-3000:]
  return listening, workers


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
  """In-process mining (one output file) while a thread watches this process's sockets."""
  out = tmp_path_factory.mktemp("reference") / "pairs.csv"
  listening, done = set(), threading.Event()

  def watch():
    while not done.is_set():
      _sample([os.getpid()], listening)
      time.sleep(0.05)
  watcher = threading.Thread(target=watch)
  watcher.start()
  try:
    report = mining.mine_pairs(world.clicklog, world.catalog, out,
                               _cfg(num_shards=1), verbose=False)
  finally:
    done.set()
    watcher.join()
  return out, report, listening


def _is_loopback(addr) -> bool:
  if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
    addr = addr.ipv4_mapped
  return addr.is_loopback


@linux_proc
def test_proc_socket_reader_sees_wildcard_and_loopback_listeners():
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as wild, socket.socket() as local:
    wild.bind(("0.0.0.0", 0))
    local.bind(("127.0.0.1", 0))
    wild.listen()
    local.listen()
    seen = set()
    _sample([os.getpid()], seen)
  assert seen == {ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("127.0.0.1")}
  assert [_is_loopback(ip) for ip in sorted(seen)] == [False, True]


@linux_proc
def test_in_process_run_listens_on_no_socket(reference):
  # Beam's DirectRunner would open a worker pool on [::] (and try to fetch Prism).
  assert reference[2] == set()


@linux_proc
def test_mining_command_under_two_worker_processes_matches_in_process(world, reference,
                                                                      tmp_path):
  """`python -m ...mining` with multi_processing: the graph is pickled to 2 worker
  processes (a class defined in __main__ cannot be); same pairs as in-process; every
  socket the run listens on is loopback."""
  two = tmp_path / "two_workers" / "pairs.csv"
  listening, workers = _run_watching_sockets(
      [sys.executable, "-m", "esspr_jax.ingest.mining",
       f"--config={REPO / 'configs' / 'tiny.py'}", f"--clicklog={world.clicklog}",
       f"--catalog={world.catalog}", f"--out={two}",
       "--direct_running_mode=multi_processing", "--direct_num_workers=2"], REPO)
  assert workers == 2
  assert listening and all(_is_loopback(ip) for ip in listening), listening
  expected = _rows(reference[0])
  assert len(expected) > 100 and _rows(two) == expected


def _csv_records(path: pathlib.Path) -> list:
  """(path, byte offset, line) of every line after the header, computed directly."""
  data, out, pos = path.read_bytes(), [], 0
  for line in data.splitlines(keepends=True):
    if pos:
      out.append((str(path), pos, line))
    pos += len(line)
  return out


def test_csv_source_splits_lose_and_repeat_no_line(tmp_path):
  path = tmp_path / "log.csv"
  lines = [b"session_id,query,listing_id"] + [b"s%d,q,%s" % (i, b"x" * (i % 17))
                                               for i in range(300)]
  path.write_bytes(b"\r\n".join(lines))  # CRLF, no newline at the end
  source = clicklog_source.CsvLines(str(path))
  splits = [(s.source, s.start_position, s.stop_position)
            for s in source.split(desired_bundle_size=97)]
  assert len(splits) > 20
  source_test_utils.assert_sources_equal_reference_source((source, None, None), splits)
  records = source_test_utils.read_from_source(source)
  assert sorted(records) == sorted(_csv_records(path))
  # Dynamic splitting (what Dataflow's rebalancing does) at every fraction of one split.
  source_test_utils.assert_split_at_fraction_exhaustive(splits[3][0], splits[3][1],
                                                        splits[3][2])


def test_parquet_source_splits_by_row_group_and_numbers_rows(tmp_path):
  path = tmp_path / "log.parquet"
  table = pa.table({"session_id": [f"s{i}" for i in range(1000)],
                    "relevance": [i / 1000 for i in range(1000)]})
  pq.write_table(table, path, row_group_size=64)
  source = clicklog_source.ParquetRows(str(path))
  splits = [(s.source, s.start_position, s.stop_position)
            for s in source.split(desired_bundle_size=1024)]
  assert len(splits) > 3
  source_test_utils.assert_sources_equal_reference_source((source, None, None), splits)
  records = sorted(source_test_utils.read_from_source(source), key=lambda r: r[1])
  assert [r[1] for r in records] == list(range(1, 1001))
  assert [r[2] for r in records] == [[f"s{i}", i / 1000] for i in range(1000)]


def _cfg(**overrides):
  cfg = mining_config("tiny")
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def test_sharded_output_reads_back_by_glob_and_builds_a_dataset(world, reference, tmp_path):
  from esspr_jax.input import esspr_tfds  # pylint: disable=import-outside-toplevel
  one = reference[0]
  out = world.out_dir / "pairs.csv"  # beside images/, as the builder needs
  report = mining.mine_pairs(world.clicklog, world.catalog, out, _cfg(num_shards=3),
                             verbose=False)
  names = sorted(p.name for p in out.parent.glob("pairs*.csv") if "rejects" not in p.name)
  assert names == [f"pairs-0000{i}-of-00003.csv" for i in range(3)]
  assert report.output_files == [str(out.parent / n) for n in names]
  assert not out.exists()
  assert _rows(out) == _rows(one) == _rows(str(out.parent / "pairs-*.csv"))
  # Rows are numbered across the shards; locate() finds each in its own file.
  rows = list(pair_files.read_pairs(out))
  assert len({r.source_row for r in rows}) == len(rows) == report.pairs_written
  last = rows[-1]
  path, line = pair_files.locate(out, last.source_row)
  assert next(r for r in read_one_file(path) if r.source_row == line) == last
  # The TFDS builder takes the same --out path (or a glob) and gets every pair.
  built = esspr_tfds.build_pairs_dataset(out, world.out_dir, tmp_path / "tfds", "shards",
                                         max_image_side=16)
  assert built.num_examples == report.pairs_written
  # Mining again into the same --out replaces the shards: no glob mixes two runs.
  mining.mine_pairs(world.clicklog, world.catalog, out, _cfg(num_shards=1), verbose=False)
  assert out.is_file() and not list(out.parent.glob("pairs-*-of-*.csv"))
  with pytest.raises(DataError, match="pair file not found"):
    pair_files.expand(tmp_path / "nothing.csv")


def test_title_overlap_is_jaccard_of_word_sets():
  assert mining_graph.title_tokens("M6 x 40mm, Zinc!") == {"m6", "x", "40mm", "zinc"}
  assert mining_graph.title_overlap("red mug 350 ml", "Red MUG blue") == pytest.approx(2 / 5)
  assert mining_graph.title_overlap("", "red") == 0.0


def test_title_overlap_constraint_drops_pairs_whose_titles_disagree(world, reference,
                                                                    tmp_path):
  base, r0 = reference[0], reference[1]
  strict = tmp_path / "strict.csv"
  r1 = mining.mine_pairs(world.clicklog, world.catalog, strict,
                         _cfg(min_title_overlap=0.3), verbose=False)
  assert r0.stages["dropped_title_overlap"] == 0
  dropped = r1.stages["dropped_title_overlap"]
  assert 0 < dropped and r1.pairs_written < r0.pairs_written
  kept = list(pair_files.read_pairs(strict))
  assert all(mining_graph.title_overlap(r.trigger_title, r.recall_title) >= 0.3 for r in kept)
  below = [r for r in pair_files.read_pairs(base)
           if mining_graph.title_overlap(r.trigger_title, r.recall_title) < 0.3]
  assert below and not {(r.trigger_id, r.recall_id) for r in below} & {
      (r.trigger_id, r.recall_id) for r in kept}
