"""argparse `type=` checks for numeric options: finite and in range, rejected at parse time in one line.

  p.add_argument("--cfg", type=number(lo=1))            # float ≥ 1
  p.add_argument("--shift", type=number(lo=0, open_lo=True))  # float > 0
  p.add_argument("--steps", type=COUNT)                  # int ≥ 1
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def number(kind: type = float, lo: float | None = None, hi: float | None = None,
           open_lo: bool = False) -> Callable[[str], float]:
  """A parser of `kind` (float or int) values in [lo, hi] ((lo, hi] with open_lo); floats must be finite."""
  what = "an integer" if kind is int else "a number"

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    if lo is not None and (value <= lo if open_lo else value < lo):
      raise argparse.ArgumentTypeError(f"{text} must be {'>' if open_lo else '≥'} {lo:g}")
    if hi is not None and value > hi:
      raise argparse.ArgumentTypeError(f"{text} must be ≤ {hi:g}")
    return value
  parse.__name__ = kind.__name__
  return parse


COUNT = number(int, lo=1)  # ≥ 1
NON_NEGATIVE_INT = number(int, lo=0)
GUIDANCE = number(float, lo=1)  # classifier-free guidance scale (1 disables)
POSITIVE = number(float, lo=0, open_lo=True)
FRACTION = number(float, lo=0, hi=1)


def image_size(text: str) -> tuple[int, int]:
  """`--size 512x768` → (height, width)."""
  try:
    h, w = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise ValueError(f"--size {text!r} must look like 512x512 (HEIGHTxWIDTH)") from None
  return h, w
