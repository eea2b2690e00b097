"""Writes constraints.txt: the installed version of every dependency of nextstep_jax (and of theirs).

Refresh (in an environment where `pip install -e ".[test,tpu]"` works and the tests pass):

  python .ci/freeze_constraints.py > constraints.txt            # extras test,tpu (what .ci/run installs)
  python .ci/freeze_constraints.py --extras test,beam > constraints-beam.txt  # in the Beam venv (see .ci/run)

Reads install_requires and the given extras from setup.py, walks their requirements through the installed
distributions' metadata (markers evaluated here, extras followed), and pins each to its installed version — like
`pip freeze`, restricted to what nextstep_jax needs. Local version labels are dropped (torch 2.13.0+cpu → 2.13.0).
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("test", "tpu")


def setup_requirements(extras=EXTRAS) -> list[str]:
  """install_requires + extras_require[extra] for `extras`, read from setup.py without running it."""
  tree = ast.parse((ROOT / "setup.py").read_text())
  call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
  kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
  return list(kw.get("install_requires", [])) + [r for e in extras for r in kw.get("extras_require", {}).get(e, [])]


def closure(requirements: list[str]) -> dict[str, str]:
  """{canonical name: installed version} of the requirements and everything they require."""
  env = default_environment()
  pinned: dict[str, str] = {}
  todo = [(Requirement(r), "") for r in requirements]
  seen: set[tuple[str, frozenset]] = set()
  while todo:
    req, extra = todo.pop()
    if req.marker is not None and not req.marker.evaluate(dict(env, extra=extra)):
      continue
    name = canonicalize_name(req.name)
    key = (name, frozenset(req.extras))
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
      sys.exit(f"{req.name} is required but not installed; install the project first (pip install -e \".[test,tpu]\")")
    pinned[name] = re.sub(r"\+.*$", "", dist.version)
    for sub in dist.requires or []:
      sub_req = Requirement(sub)
      for e in req.extras or {""}:
        todo.append((sub_req, e))
  return pinned


def main() -> None:
  ap = argparse.ArgumentParser(description="print constraints.txt for nextstep_jax and the given extras")
  ap.add_argument("--extras", default=",".join(EXTRAS), help="comma-separated extras of setup.py to include")
  extras = tuple(e for e in ap.parse_args().extras.split(",") if e)
  pins = closure(setup_requirements(extras))
  pins.pop("nextstep-jax", None)
  if "beam" in extras:  # apache-beam needs older pillow / protobuf / pyarrow: its own environment
    print("# Tested versions for the Beam environment (.ci/run's second venv, the `beam` tests):")
    print('#   pip install -c constraints-beam.txt -e ".[test,beam]"')
    print("# Refresh there: python .ci/freeze_constraints.py --extras test,beam > constraints-beam.txt")
  else:
    print("# Tested versions of every dependency of nextstep_jax (direct and transitive), from one environment that")
    print("# passes the tests. Used by .ci/run and the README install command:  pip install -c constraints.txt -e .")
    print("# Refresh: python .ci/freeze_constraints.py > constraints.txt   (after adding a dependency to setup.py)")
  for name in sorted(pins):
    print(f"{name}=={pins[name]}")


if __name__ == "__main__":
  main()
