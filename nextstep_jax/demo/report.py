"""Demo outputs drawn with PIL only (no matplotlib): loss curves, a verdict-bordered sample grid, `report.md`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nextstep_jax.images import make_grid, save_png

GOOD, BAD = (40, 170, 70), (210, 40, 40)
_SERIES_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
SCORE_COLUMNS = (("color", "colour"), ("kind", "shape"), ("count", "count"), ("objects", "objects"),
                 ("position", "position"), ("fully_correct_single", "fully correct, 1 object"),
                 ("fully_correct_two", "fully correct, 2 objects"), ("fully_correct", "**fully correct**"))


def verdict_grid(images_uint8: np.ndarray, correct: Sequence[bool] | None, ncols: int, scale: int = 2,
                 border: int = 2) -> np.ndarray:
  """Images upscaled `scale`× (nearest), each framed green (fully correct) or red (not), tiled row-major."""
  imgs = np.repeat(np.repeat(np.asarray(images_uint8, np.uint8), scale, axis=1), scale, axis=2)
  if correct is not None:
    framed = []
    for img, ok in zip(imgs, correct):
      f = np.empty((img.shape[0] + 2 * border, img.shape[1] + 2 * border, 3), np.uint8)
      f[:] = GOOD if ok else BAD
      f[border:-border, border:-border] = img
      framed.append(f)
    imgs = np.stack(framed)
  return make_grid(imgs, ncols=min(ncols, len(imgs)), pad=2)


def _nice_ticks(lo: float, hi: float, log: bool) -> list[float]:
  if log:
    return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
  span = hi - lo or 1.0
  step = 10 ** math.floor(math.log10(span / 4))
  step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= 6)
  return [t * step for t in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def line_panel(title: str, series: dict[str, tuple[Sequence[float], Sequence[float]]], log_y: bool = True,
               size: tuple[int, int] = (460, 300)) -> np.ndarray:
  """One plot (uint8 HxWx3): a line per series {label: (steps, values)}, log-scale y by default."""
  w, h = size
  img = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(img)
  font = ImageFont.load_default()
  left, right, top, bottom = 58, 12, 24, 34
  d.text((left, 5), title, fill="black", font=font)
  pts = {k: (np.asarray(x, float), np.asarray(y, float)) for k, (x, y) in series.items() if len(x)}
  ys = np.concatenate([y[np.isfinite(y) & ((y > 0) if log_y else True)] for _, y in pts.values()] or [np.ones(1)])
  xs = np.concatenate([x for x, _ in pts.values()] or [np.ones(1)])
  y_lo, y_hi = (float(ys.min()), float(ys.max())) if ys.size else (1.0, 2.0)
  if y_hi <= y_lo:
    y_hi = y_lo * 2 if log_y else y_lo + 1
  x_lo, x_hi = 0.0, float(max(xs.max(), 1))
  fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
  to_px = lambda x, y: (left + (x - x_lo) / (x_hi - x_lo) * (w - left - right),
                        h - bottom - (fy(y) - fy(y_lo)) / (fy(y_hi) - fy(y_lo)) * (h - top - bottom))
  d.rectangle([left, top, w - right, h - bottom], outline="black")
  for t in _nice_ticks(y_lo, y_hi, log_y):
    if y_lo <= t <= y_hi:
      _, py = to_px(x_lo, t)
      d.line([left - 4, py, left, py], fill="black")
      d.text((4, py - 6), f"{t:.3g}", fill="black", font=font)
  for t in _nice_ticks(x_lo, x_hi, False):
    px, _ = to_px(t, y_lo)
    d.line([px, h - bottom, px, h - bottom + 4], fill="black")
    d.text((px - 10, h - bottom + 6), f"{t:g}", fill="black", font=font)
  d.text((w // 2 - 12, h - 14), "step", fill="black", font=font)
  for i, (label, (x, y)) in enumerate(pts.items()):
    color = _SERIES_COLORS[i % len(_SERIES_COLORS)]
    ok = np.isfinite(y) & ((y > 0) if log_y else True)
    line = [to_px(a, b) for a, b in zip(x[ok], y[ok])]
    if len(line) > 1:
      d.line(line, fill=color, width=2)
    d.text((w - right - 150, top + 6 + 12 * i), f"— {label}", fill=color, font=font)
  return np.asarray(img)


def loss_curves(lm_history: list[dict], vae_history: list[dict], path: str | Path) -> Path:
  """`path` ← [LM: loss, image (flow) loss, text loss | VAE: L1, L2] from the metrics.jsonl histories."""
  def col(hist, key):
    rows = [r for r in hist if key in r]
    return [r["step"] for r in rows], [r[key] for r in rows]
  lm = line_panel("LM training (metrics.jsonl)", {"total loss": col(lm_history, "loss"),
                                                 "image (flow) loss": col(lm_history, "image_loss"),
                                                 "text loss": col(lm_history, "text_loss")})
  vae = line_panel("VAE training", {"L1": col(vae_history, "l1"), "L2": col(vae_history, "l2")})
  return save_png(path, np.concatenate([lm, vae], axis=1))


def pct(v: float) -> str:
  return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def score_table(rows: dict[str, dict]) -> str:
  """Markdown table: one row per scored image set, one column per attribute."""
  head = "| images | " + " | ".join(name for _, name in SCORE_COLUMNS) + " |"
  sep = "|---|" + "---:|" * len(SCORE_COLUMNS)
  body = [f"| {label} | " + " | ".join(pct(s.get(k)) for k, _ in SCORE_COLUMNS) + " |" for label, s in rows.items()]
  return "\n".join([head, sep, *body])


def timing_table(timings: dict[str, dict], phases: Sequence[tuple[str, str]]) -> str:
  lines = ["| phase | wall time |", "|---|---:|"]
  total = 0.0
  for name, what in phases:
    t = timings.get(name, {}).get("seconds")
    if t is not None:
      total += t
      lines.append(f"| {what} | {_fmt_s(t)} |")
  lines.append(f"| **total** | **{_fmt_s(total)}** |")
  return "\n".join(lines)


def _fmt_s(t: float) -> str:
  return f"{int(t // 60)} min {t % 60:04.1f} s" if t >= 60 else f"{t:.1f} s"
