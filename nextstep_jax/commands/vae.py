"""`nextstep-jax vae roundtrip`: encode + decode one image with a converted VAE and report the PSNR."""
from __future__ import annotations

import argparse

from nextstep_jax.commands.arg_types import COUNT, NON_NEGATIVE_INT


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("vae", help="image tokenizer (VAE) utilities")
  actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
  r = actions.add_parser("roundtrip", help="encode + decode an image, write the reconstruction, print PSNR")
  for flag, what in (("--checkpoint", "model directory with vae_params (from `convert vae`)"),
                     ("--image", "input image file (any PIL format)"), ("--out", "output PNG path")):
    r.add_argument(flag, required=True, help=what)
  r.add_argument("--size", type=COUNT, default=None, help="resize + center-crop to SIZE×SIZE first (default: as is)")
  r.add_argument("--seed", type=NON_NEGATIVE_INT, default=0,
                 help="posterior sampling seed (non-deterministic VAEs only)")
  r.set_defaults(func=_roundtrip)


def _roundtrip(args) -> int:
  import jax
  import numpy as np

  from nextstep_jax import images
  from nextstep_jax.convert.vae import load_vae
  from nextstep_jax.models import flux_vae

  cfg, params = load_vae(args.checkpoint)
  img = images.load_image(args.image)
  if args.size:
    img = images.resize_center_crop(img, args.size)
  flux_vae.check_image_shape(cfg, (1,) + img.shape)
  z = flux_vae.encode_latents(params, cfg, images.to_float(img)[None], rng=jax.random.key(args.seed))
  recon = images.to_uint8(np.asarray(flux_vae.decode_latents(params, cfg, z))[0])
  images.save_png(args.out, recon)
  print(f"{args.image} ({img.shape[0]}x{img.shape[1]}) → latents {tuple(z.shape[1:])} → {args.out}: "
        f"PSNR {images.psnr(img, recon):.2f} dB")
  return 0
