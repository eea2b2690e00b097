"""`nextstep-jax <command>`: thin argument parsing; each command lives in `nextstep_jax/commands/<name>.py`.

Every command module exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Unrecognised `--config.a.b=value` arguments are collected into `args.config_overrides`.

The edge every command shares (so no command handles these cases itself):
- arguments whose dest is in PATH_DESTS are made absolute once (URLs kept); those in OUTPUT_DESTS must be
  writable before the command starts;
- float arguments must be finite; argparse errors are one line;
- any exception becomes one line `nextstep-jax CMD: error: …` (exit 2 for bad input, 1 for an internal error;
  `--debug` re-raises with the traceback);
- on a machine without TPU (and no GPU plugin) jax is kept on the CPU, so libtpu prints nothing, and absl/Orbax
  logs are hidden unless `--verbose` (our error line says what failed).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import os
import sys
import threading

COMMANDS = ("convert", "vae", "sample", "serve", "train", "data", "demo", "aot", "lora")
PATH_DESTS = ("checkpoint", "out", "image", "src", "dst", "workdir", "vae", "model", "prompts")
OUTPUT_DESTS = ("out", "dst", "workdir")
_GPU_PLUGINS = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


class OneLineParser(argparse.ArgumentParser):
  """argparse with one-line errors (no usage block): `PROG: error: MESSAGE; see PROG --help`."""

  def error(self, message: str):
    print(f"{self.prog}: error: {message}; see `{self.prog} --help`", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
  parser = OneLineParser(prog="nextstep-jax", description="NextStep-1 in JAX/Flax: convert, sample, train.")
  from nextstep_jax import __version__
  parser.add_argument("--version", action="version", version=f"nextstep_jax {__version__}")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name in COMMANDS:
    try:
      module = importlib.import_module(f"nextstep_jax.commands.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"nextstep_jax.commands.{name}":
        raise
      continue
    module.register(sub)
  for leaf in _leaf_parsers(parser):
    if "--debug" not in leaf._option_string_actions:
      leaf.add_argument("--debug", action="store_true", help="raise errors with tracebacks instead of one line")
    if "--verbose" not in leaf._option_string_actions:
      leaf.add_argument("--verbose", action="store_true", help="also show library logs (absl, Orbax, libtpu)")
  return parser


def _leaf_parsers(parser: argparse.ArgumentParser):
  subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
  if not subs:
    yield parser
  for action in subs:
    for child in dict.fromkeys(action.choices.values()):
      yield from _leaf_parsers(child)


def _flag(dest: str) -> str:
  return "--" + dest.replace("_", "-")


def prepare_args(args: argparse.Namespace) -> None:
  """The shared edge: finite floats, absolute paths, writable outputs (raises UserError)."""
  from nextstep_jax import paths
  from nextstep_jax.errors import UserError
  for dest, value in vars(args).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise UserError(f"{_flag(dest)} {value}: must be a finite number")
  for dest in PATH_DESTS:
    value = getattr(args, dest, None)
    if isinstance(value, str) and value:
      setattr(args, dest, paths.resolve(value))
  for dest in OUTPUT_DESTS:
    value = getattr(args, dest, None)
    if isinstance(value, str) and value:
      paths.check_writable(value, _flag(dest))


def quiet_environment(verbose: bool) -> None:
  """No libtpu start-up noise on machines without TPU chips; absl/Orbax logs only with --verbose."""
  if not verbose:
    logging.getLogger("absl").setLevel(logging.CRITICAL)  # Orbax logs write errors with thread tracebacks
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # after a failed write, Orbax/TensorStore threads report the aborted futures as tracebacks of their own
    sys.unraisablehook = lambda _: None
    threading.excepthook = lambda _: None
  if "JAX_PLATFORMS" in os.environ or any(importlib.util.find_spec(p) for p in _GPU_PLUGINS):
    return
  from jax._src import hardware_utils
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_platforms", "cpu")  # jax reads the variable at import; it may be imported already


def describe_error(e: BaseException, output: str | None = None) -> tuple[str, int]:
  """(one line, exit code): 2 for bad input / environment, 1 for an internal error. `output`: the command's
  output path, named when an OS error does not name its file."""
  from nextstep_jax.errors import UserError, find_os_error, os_error_line
  os_err = None if isinstance(e, UserError) else find_os_error(e)
  if os_err is not None:
    return os_error_line(os_err, None if os_err.filename else output), 2
  if isinstance(e, KeyError) and e.args:
    text = str(e.args[0])
  else:
    text = str(e)
  text = " ".join(text.split())
  if len(text) > 600:
    text = text[:600] + " …"
  if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, KeyError, NotADirectoryError)):
    return text, 2
  return f"{type(e).__name__}: {text} (an internal error; rerun with --debug for the traceback)", 1


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  try:  # argparse exits on bad arguments (one line, OneLineParser) and on --help: return its code instead
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
      parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 2
  overrides = [a for a in rest if a.startswith("--config.")]
  args.config_overrides = overrides
  quiet_environment(getattr(args, "verbose", False))
  try:
    prepare_args(args)
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    return 130
  except Exception as e:  # noqa: BLE001 — the one place every error becomes one line
    if getattr(args, "debug", False):
      raise
    line, code = describe_error(e, next((getattr(args, d) for d in OUTPUT_DESTS if getattr(args, d, None)), None))
    print(f"nextstep-jax {args.command}: error: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
  sys.exit(main())
