"""`nextstep-jax <command>`: thin argument parsing; each command lives in `nextstep_jax/commands/<name>.py`.

Every command module exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Unrecognised `--config.a.b=value` arguments are collected into `args.config_overrides`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("convert", "vae", "sample", "serve", "train", "data", "demo", "aot", "eval")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="nextstep-jax", description="NextStep-1 in JAX/Flax: convert, sample, train.")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in COMMANDS:
    try:
      module = importlib.import_module(f"nextstep_jax.commands.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"nextstep_jax.commands.{name}":
        raise
      continue
    module.register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  args.config_overrides = overrides
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    return 130
  except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
    if getattr(args, "debug", False):
      raise
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"nextstep-jax {args.command}: error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
