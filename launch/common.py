"""Small pieces the launchers share: quoting commands for a shell, free ports."""
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
