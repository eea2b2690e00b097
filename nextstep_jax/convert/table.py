"""The conversion engine: a table of `Rule`s maps our parameter paths to source tensor names, both directions.

A rule's `theirs` may contain `{i}`: our leaf then stacks `stack` source tensors on axis 0 (scanned layers).
Kinds (how one source tensor becomes one of our slices; the inverse is exact, so round trips are bit-exact):
  same    identical shape                       (norm weights, embeddings)
  flat    source is our slice flattened         (q/k/v biases (H·K,) → (H, K))
  linear  torch Linear [out, in] → kernel (in…, out…); `n_in` = number of leading input axes of our slice
  conv    torch Conv2d [out, in, kh, kw] → (kh, kw, in, out)

Before any data is read, `check` compares the whole table with the source's headers and raises one
`ConversionError` that lists every missing, unexpected and mis-shaped tensor.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

Path = tuple[str, ...]
DTYPE_NAMES = {"float32": np.float32, "fp32": np.float32, "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": np.float16, "fp16": np.float16}


class ConversionError(ValueError):
  """Source tensors do not match the conversion table."""


def parse_dtype(name: str | None) -> np.dtype | None:
  """'bfloat16' → ml_dtypes bfloat16 (None passes through); unknown names raise a one-line error."""
  if name is None:
    return None
  if name not in DTYPE_NAMES:
    raise ConversionError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
  d = DTYPE_NAMES[name]
  return np.dtype(ml_dtypes.bfloat16) if d == "bfloat16" else np.dtype(d)


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: Path
  theirs: str
  kind: str = "same"
  n_in: int = 1
  stack: int = 0

  def keys(self) -> list[str]:
    return [self.theirs.format(i=i) for i in range(self.stack)] if self.stack else [self.theirs]

  def slice_shape(self, our_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(our_shape[1:]) if self.stack else tuple(our_shape)

  def their_shape(self, s: Sequence[int]) -> tuple[int, ...]:
    """Source tensor shape for one of our slices of shape `s`."""
    if self.kind == "same":
      return tuple(s)
    if self.kind == "flat":
      return (math.prod(s),)
    if self.kind == "linear":
      return (math.prod(s[self.n_in:]), math.prod(s[:self.n_in]))
    if self.kind == "conv":
      return (s[3], s[2], s[0], s[1])
    raise ValueError(f"unknown rule kind {self.kind!r}")

  def to_ours(self, x: np.ndarray, s: Sequence[int]) -> np.ndarray:
    if self.kind == "linear":
      x = x.T
    elif self.kind == "conv":
      x = x.transpose(2, 3, 1, 0)
    return x.reshape(s)

  def to_theirs(self, x: np.ndarray) -> np.ndarray:
    if self.kind == "linear":
      return x.reshape(math.prod(x.shape[:self.n_in]), -1).T
    if self.kind == "conv":
      return x.transpose(3, 2, 0, 1)
    return x.reshape(self.their_shape(x.shape))


def _fmt(items: list[str], limit: int = 12) -> str:
  more = f" … (+{len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def check(rules: Sequence[Rule], source_keys: Iterable[str], shape_of: Callable[[str], Sequence[int]],
          our_shapes: Mapping[Path, Sequence[int]], ignore: Sequence[str] = (), what: str = "checkpoint") -> None:
  """Raises one ConversionError naming every missing / unexpected / mis-shaped source tensor."""
  source = set(source_keys)
  expected: dict[str, tuple[int, ...]] = {}
  for r in rules:
    if r.ours not in our_shapes:
      raise KeyError(f"conversion table names {'/'.join(r.ours)}, which the model does not have")
    shape = r.their_shape(r.slice_shape(our_shapes[r.ours]))
    for k in r.keys():
      expected[k] = shape
  uncovered = sorted("/".join(p) for p in set(our_shapes) - {r.ours for r in rules})
  if uncovered:
    raise KeyError(f"conversion table does not cover model parameters: {_fmt(uncovered)}")
  missing = sorted(set(expected) - source)
  ignored = [re.compile(p) for p in ignore]
  unexpected = sorted(k for k in source - set(expected) if not any(p.fullmatch(k) for p in ignored))
  mismatched = sorted(f"{k} has shape {tuple(shape_of(k))}, expected {expected[k]}"
                      for k in set(expected) & source if tuple(shape_of(k)) != expected[k])
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} tensor(s): {_fmt(missing)}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} tensor(s): {_fmt(unexpected)}")
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): {_fmt(mismatched, 6)}")
  if problems:
    raise ConversionError(f"{what} does not match the model config: " + "; ".join(problems)
                          + ". Check that the config matches the checkpoint (layers, heads, vocab, …).")


def import_leaves(rules: Sequence[Rule], get: Callable[[str], np.ndarray], our_shapes: Mapping[Path, Sequence[int]],
                  dtype: np.dtype | None = None) -> Iterator[tuple[Path, np.ndarray]]:
  """Yields (our path, array) one leaf at a time; a stacked leaf is filled slice by slice."""
  for r in rules:
    shape = tuple(our_shapes[r.ours])
    if r.stack:
      first = r.to_ours(get(r.keys()[0]), shape[1:])
      out = np.empty(shape, dtype or first.dtype)
      out[0] = first
      for i, k in enumerate(r.keys()[1:], start=1):
        out[i] = r.to_ours(get(k), shape[1:])
    else:
      out = r.to_ours(get(r.theirs), shape)
      out = out.astype(dtype or out.dtype, copy=False)
    yield r.ours, np.ascontiguousarray(out)


def export_tensors(rules: Sequence[Rule], get_leaf: Callable[[Path], np.ndarray],
                   dtype: np.dtype | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (source name, tensor) in table order; reads one of our leaves at a time."""
  for r in rules:
    leaf = np.asarray(get_leaf(r.ours))
    slices = [leaf[i] for i in range(r.stack)] if r.stack else [leaf]
    for k, x in zip(r.keys(), slices):
      y = np.ascontiguousarray(r.to_theirs(x))
      yield k, y.astype(dtype, copy=False) if dtype is not None else y
