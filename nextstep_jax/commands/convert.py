"""`nextstep-jax convert {qwen,vae,nextstep}` and `nextstep-jax convert export-…`: weight conversion both ways.

Every destination is written into a temporary sibling and renamed at the end (`paths.atomic_dir`), so a failed
conversion leaves nothing half-written and the rerun starts clean; an existing destination needs --overwrite.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nextstep_jax.commands.arg_types import POSITIVE
from nextstep_jax.paths import atomic_dir


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("convert", help="convert weights into (or out of) nextstep_jax checkpoints")
  kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

  q = kinds.add_parser("qwen", help="HF Qwen2/Qwen2.5 directory → model directory (Orbax params + config)")
  _io_args(q)
  q.set_defaults(func=_qwen)

  qe = kinds.add_parser("export-qwen", help="model directory → HF Qwen2 safetensors + config.json")
  _io_args(qe)
  qe.add_argument("--max-shard-gb", type=POSITIVE, default=4.0)
  qe.set_defaults(func=_export_qwen)

  v = kinds.add_parser("vae", help="Flux/NextStep VAE (BFL ae.safetensors, NextStep vae/, diffusers AutoencoderKL) "
                                   "→ model directory (vae_params + config)")
  _io_args(v)
  v.add_argument("--layout", default="auto", choices=("auto", "bfl", "nextstep", "diffusers"),
                 help="source weight layout (default: detect)")
  v.set_defaults(func=_vae)

  ve = kinds.add_parser("export-vae", help="model directory → BFL-layout VAE safetensors file")
  _io_args(ve)
  ve.set_defaults(func=_export_vae)

  n = kinds.add_parser("nextstep", help="NextStep-1 release directory (config.json, model*.safetensors, vae/, "
                                        "tokenizer) → one model directory that sample and train load")
  _io_args(n)
  n.add_argument("--quantize", default=None, choices=("int8",),
                 help="store the decoder's dense kernels as int8 with per-output-channel scales (sampling only)")
  n.add_argument("--quantize-head", action="store_true", help="with --quantize: the flow head's kernels too")
  n.set_defaults(func=_nextstep)

  ne = kinds.add_parser("export-nextstep", help="model directory → NextStep-1 release layout")
  _io_args(ne)
  ne.add_argument("--max-shard-gb", type=POSITIVE, default=5.0)
  ne.set_defaults(func=_export_nextstep)


def _io_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--src", required=True, help="source directory")
  p.add_argument("--dst", required=True, help="destination directory")
  p.add_argument("--dtype", default=None, help="output dtype: float32, bfloat16, float16 (default: keep)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing destination")


def _final(files, tmp: Path, dst: str) -> list[str]:
  """Paths written under `tmp`, as they are named after the rename to `dst`."""
  return [str(dst) + str(f)[len(str(tmp)):] if str(f).startswith(str(tmp)) else str(f) for f in files]


def _qwen(args) -> int:
  from nextstep_jax.convert.qwen import convert_qwen
  with atomic_dir(args.dst, args.overwrite) as tmp:
    cfg = convert_qwen(args.src, tmp, args.dtype)
  print(f"converted {args.src} → {args.dst} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})")
  return 0


def _export_qwen(args) -> int:
  from nextstep_jax.convert.qwen import export_qwen
  with atomic_dir(args.dst, args.overwrite) as tmp:
    files = export_qwen(args.src, tmp, args.dtype, int(args.max_shard_gb * (1 << 30)))
  print(f"exported {args.src} → {', '.join(_final(files, tmp, args.dst))}")
  return 0


def _vae(args) -> int:
  from nextstep_jax.convert.vae import convert_vae
  if Path(args.dst).exists():  # adding a VAE to a model directory: its vae_params/ appear atomically (Orbax)
    cfg = convert_vae(args.src, args.dst, args.layout, args.dtype, overwrite=args.overwrite)
  else:
    with atomic_dir(args.dst) as tmp:
      cfg = convert_vae(args.src, tmp, args.layout, args.dtype)
  print(f"converted VAE {args.src} → {args.dst}/vae_params (ch {cfg.ch}, ch_mult {list(cfg.ch_mult)}, "
        f"z_channels {cfg.z_channels}, encoder_norm {cfg.encoder_norm}, psz {cfg.psz})")
  return 0


def _export_vae(args) -> int:
  from nextstep_jax.convert.vae import export_vae_bfl
  out = export_vae_bfl(args.src, args.dst, args.dtype, overwrite=args.overwrite)
  print(f"exported VAE {args.src} → {out}")
  return 0


def _nextstep(args) -> int:
  from nextstep_jax.convert.nextstep import convert_nextstep
  if args.quantize_head and not args.quantize:
    raise ValueError("--quantize-head needs --quantize int8")
  with atomic_dir(args.dst, args.overwrite) as tmp:
    cfg = convert_nextstep(args.src, tmp, args.dtype)
    if args.quantize:
      from nextstep_jax.convert.quantized import quantize_model_dir
      quantize_model_dir(tmp, args.quantize, args.quantize_head)
  print(f"converted {args.src} → {args.dst} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"head {cfg.fm_head_dim}×{cfg.fm_head_layers}{', int8 kernels' if args.quantize else ''})")
  return 0


def _export_nextstep(args) -> int:
  from nextstep_jax.convert.nextstep import export_nextstep
  with atomic_dir(args.dst, args.overwrite) as tmp:
    files = export_nextstep(args.src, tmp, args.dtype, int(args.max_shard_gb * (1 << 30)))
  print(f"exported {args.src} → {', '.join(_final(files, tmp, args.dst))}")
  return 0
