"""A quiet console: the tiny main job prints only its own lines (stage lines, progress,
tables), and the libraries' logs land in <workdir>/logs/ (and on the console with
--verbosity=1)."""
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import warnings

from esspr_jax import console

REPO = pathlib.Path(__file__).resolve().parents[1]

# Every format the main job prints; anything else on stdout or stderr is noise.
_NUM = r"\d+(\.\d+)?"
JOB_LINE_FORMATS = [re.compile(p) for p in (
    r"",
    r"\[jax\] backend \w+: \d+ x .+ \(\d+ process(es)?\)",
    rf"\[world\] generated \S+ in {_NUM}s",
    rf"\[mine\] \d+ pairs -> \S+ in {_NUM}s",
    rf"\[build\] \w+ from \S+ in {_NUM}s",
    rf"\[tokenizer\] \w+ in {_NUM}s",
    rf"training \d+ steps on mesh \{{.*\}} \(\d+ \w+ devices\), global batch \d+; "
    rf"step compiled in {_NUM}s",
    rf"step \d+/\d+ \(\d+%\) \| eta [\d:]+ \| loss {_NUM} \| .*",
    rf"eval at step \d+: \d+ pairs, gallery \d+, {_NUM}s",
    r"\|( [^|]+ \|)+",  # a Markdown table row
    r"\|(---\|)+",
    rf"done in {_NUM}(s| min) \(\d+ steps\)\.",
    r"  (demo world|datasets|checkpoints|metrics|config|logs|eval reports) +\S.*",
)]


def _noise(lines):
  return [l for l in lines if not any(f.fullmatch(l) for f in JOB_LINE_FORMATS)]


def test_the_tiny_main_job_prints_only_its_own_lines(tmp_path):
  """From another directory, as `python -m esspr_jax.main` (the `esspr-jax` entry)."""
  workdir = tmp_path / "run"
  # Eval batch 24 > the 16 eval pairs: one batch, 8 padding rows, split over 8 devices.
  result = subprocess.run(
      [sys.executable, "-m", "esspr_jax.main", f"--config={REPO}/configs/tiny.py",
       f"--workdir={workdir}", "--config.train.steps=2", "--config.train.checkpoint.every=1",
       "--config.eval.batch_size=24"],
      cwd=tmp_path, capture_output=True, text=True, timeout=1800,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  out = result.stdout.splitlines()
  assert _noise(out) == [], result.stdout
  assert _noise(result.stderr.splitlines()) == [], result.stderr
  for stage in ("[jax] backend cpu: 8 x cpu", "[world] generated", "[mine]",
                "[build] train_pairs", "[build] eval_pairs", "[tokenizer]", "| m-m |",
                "done in"):
    assert any(l.startswith(stage) for l in out), stage
  for path in ("world/manifest.json", "world/train_pairs.csv", "metrics.jsonl",
               "config.json", "checkpoints/2", "logs/main.log"):
    assert (workdir / path).exists(), path
  # The table's numbers came back through the eval hook.
  report = json.loads((workdir / "eval/eval_step_2.json").read_text())
  mrr = {s["setting"]: s["metrics"]["mrr"] for s in report["settings"]}
  assert 0.0 < mrr["m-m"] <= 1.0
  # What the console no longer shows went to the log: TFDS's prints, Orbax, Beam.
  log = (workdir / "logs/main.log").read_text()
  assert "Downloading and preparing dataset" in log
  assert " INFO absl: " in log and "apache_beam" in log
  assert "Downloading and preparing dataset" not in result.stdout


def test_library_records_go_to_the_log_file_and_with_verbosity_1_to_the_console(
    tmp_path, capfd):
  own = logging.getLogger("esspr_jax.stages")
  for verbosity in (0, 1):
    log_dir = tmp_path / f"v{verbosity}"
    with console.session(log_dir, verbosity) as path:
      logging.getLogger("orbax").info("orbax says %d", verbosity)
      logging.getLogger("absl").warning("absl warns %d", verbosity)
      warnings.warn(f"a library warning {verbosity}", DeprecationWarning)
      own.info("own info %d", verbosity)
      own.warning("own warning %d", verbosity)
    text = path.read_text()
    for record in ("orbax says", "absl warns", "a library warning", "own info", "own warning"):
      assert f"{record} {verbosity}" in text, record
    err = capfd.readouterr().err
    if verbosity == 0:  # the job's own warning, as one plain line; nothing else
      assert err.splitlines() == ["warning: own warning 0"]
    else:
      assert "INFO orbax: orbax says 1" in err and "WARNING absl: absl warns 1" in err
      assert "a library warning 1" in err
  # The set-up is undone afterwards (many commands run in one test process).
  assert not any(isinstance(h, console._LogFile) for h in logging.getLogger().handlers)


def test_log_file_names_follow_the_launchers_rank():
  assert console.log_file_name({}) == "main.log"
  assert console.log_file_name({"ESSPR_PROCESS_ID": "3"}) == "process_3.log"
  assert console.log_file_name({"SLURM_PROCID": "12"}) == "process_12.log"


def test_own_warnings_reach_a_real_console_while_descriptor_2_is_the_log(tmp_path):
  """In a real process (no test capture) descriptor 2 points at the log file during a
  session; the job's own warning lines must still reach the console, once."""
  script = ("import logging, sys; from esspr_jax import console\n"
            f"with console.session({str(tmp_path)!r}, 0) as path:\n"
            "  logging.getLogger('esspr_jax.stages').warning('own warning %d', 7)\n"
            "  logging.getLogger('orbax').warning('library noise')\n")
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stderr.splitlines() == ["warning: own warning 7"], done.stderr
  logged = "".join(p.read_text() for p in tmp_path.glob("*.log"))
  assert "own warning 7" in logged and "library noise" in logged
