"""int8 model directories: `convert … --quantize int8` rewrites `params/` with int8 kernels + scales
(`models/quant.py`) and records {"mode", "include_head"} under "quantization" in nextstep_config.json; the
exporters read such a directory back as float kernels."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from nextstep_jax import params_io
from nextstep_jax.models import quant


def quantize_model_dir(model_dir: str | Path, mode: str = "int8", include_head: bool = False) -> dict:
  """Quantizes a converted model directory in place; returns its "quantization" section."""
  if mode not in quant.MODES:
    raise ValueError(f"--quantize {mode!r} is not one of {quant.MODES}")
  model_dir = Path(model_dir)
  meta = params_io.read_model_config(model_dir)
  if meta.get("quantization"):
    raise ValueError(f"{model_dir} is already quantized ({meta['quantization']}); convert from the float weights")
  params = quant.quantize_params(params_io.load_params(model_dir / "params"), include_head)
  params_io.save_params(model_dir / "params", params, overwrite=True)
  section = {"mode": mode, "include_head": include_head}
  params_io.write_model_config(model_dir, {"quantization": section})
  return section


def leaf_loader(params_dir: str | Path) -> Callable[[tuple[str, ...]], np.ndarray]:
  """path → host array, int8 kernels dequantized to float32 (float directories read unchanged)."""
  stored = params_io.param_metadata(params_dir)

  def load(path):
    path = tuple(path)
    value = params_io.load_leaf(params_dir, path)
    scale = path[:-1] + (quant.SCALE,)
    if path[-1] == "kernel" and scale in stored:
      value = quant.dequantize_array(value, params_io.load_leaf(params_dir, scale), quant.contraction_axes(path))
    return value
  return load
