"""The package's import graph (every import, module-level or inside a function): no circles, and the layering the
README's map describes (data plumbing never imports evaluation or applications; models never import training)."""
import ast
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "nextstep_jax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
  """module → the nextstep_jax modules it imports (`from a import b` counts a.b when b is a module)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
  modules = {_module_name(f): f for f in files}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name in modules}
      elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nextstep_jax"):
        subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
        deps |= subs or ({node.module} & modules.keys())
    graph[name] = deps - {name}
  return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == "open":
        return stack[stack.index(m):] + [m]
      if m not in state and (found := visit(m)):
        return found
    stack.pop()
    state[n] = "done"
    return None
  for n in sorted(graph):
    if n not in state and (found := visit(n)):
      return found
  return None


def test_no_import_circle():
  circle = find_circle(import_graph())
  assert circle is None, " → ".join(circle)


def test_the_circle_finder_finds_circles():
  assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_circle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("lower,higher", [("nextstep_jax.data", "nextstep_jax.eval"),
                                          ("nextstep_jax.data", "nextstep_jax.apps"),
                                          ("nextstep_jax.data", "nextstep_jax.train"),
                                          ("nextstep_jax.models", "nextstep_jax.train"),
                                          ("nextstep_jax.models", "nextstep_jax.sampling")])
def test_layers(lower, higher):
  arrows = [f"{a} → {b}" for a, deps in import_graph().items() if a.startswith(lower)
            for b in deps if b.startswith(higher)]
  assert not arrows, arrows
