"""`nextstep-jax data {build,encode,inspect}`: TFDS ArrayRecord datasets, latent caches, a look at batches.

  nextstep-jax data build --kind shapes --dst /data/shapes --num 5000 --size 64 --seed 0
  nextstep-jax data build --kind image_text --src /photos --dst /data/photos   (sidecar .txt or one .jsonl)
  nextstep-jax data build --kind edit --src edits.jsonl --dst /data/edits      ({"source","target","instruction"})
  nextstep-jax data build --kind text --src /corpus --dst /data/text           (.txt files / .jsonl {"text"})
  nextstep-jax data build --kind wds --src 'shards/{00000..01023}.tar' --dst /data/wds [--workers W]  (official)
  nextstep-jax data build --kind img2dataset --src 'out/*.parquet' --dst /data/laion   (tar or parquet shards)
  nextstep-jax data build --kind hf --src /saved_dataset --dst /data/hf                (datasets.save_to_disk)
  nextstep-jax data encode --src /data/shapes --dst /data/shapes_latents --vae MODEL_DIR --resolution 64
  nextstep-jax data encode ... --parts 4 --part 2 ; ... --merge 4    (or --distributed: one part per JAX process)
  nextstep-jax data inspect --config configs/tiny.py --batches 2
  nextstep-jax data prefs --model MODEL_DIR --shapes 512 --dst /data/prefs --k 4 --scorer shapes
  nextstep-jax data prefs --src pairs.jsonl --vae MODEL_DIR --dst /data/prefs  ({"prompt","chosen","rejected"})
"""
from __future__ import annotations

import argparse

from nextstep_jax.commands.arg_types import COUNT, FRACTION, GUIDANCE, NON_NEGATIVE_INT, POSITIVE, number
from nextstep_jax.paths import is_url


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("data", help="build datasets, cache VAE latents, inspect training batches")
  actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

  b = actions.add_parser("build", help="write a TFDS ArrayRecord dataset from files (or generate shapes)")
  b.add_argument("--kind", required=True, help="image_text | edit | text | shapes | wds (official NextStep WebDataset "
                 "shards) | img2dataset (tar/parquet shards) | hf (datasets save_to_disk folder)")
  b.add_argument("--src", default=None, help="source folder or .jsonl (not needed for shapes); shard pattern for wds / "
                 "img2dataset ('shards/{00000..01023}.tar', a glob or a folder)")
  b.add_argument("--task", default="auto", help="wds: text | t2i | edit | interleave | auto (from the first sample)")
  b.add_argument("--caption-key", default="caption", help="wds: the key.json field holding the caption")
  b.add_argument("--workers", type=NON_NEGATIVE_INT, default=0, help="wds: build on Apache Beam with W DirectRunner workers "
                 "(0: in this process)")
  b.add_argument("--beam-options", default="", help="wds with --workers: extra Beam pipeline flags (e.g. "
                 "'--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp')")
  b.add_argument("--image-column", default="image", help="hf: image column")
  b.add_argument("--text-column", default="", help="hf: caption / text column (default caption, then text)")
  b.add_argument("--dst", required=True, help="output directory (the dataset lands in DST/<builder>/1.0.0)")
  b.add_argument("--num", type=COUNT, default=1000, help="shapes: number of examples")
  b.add_argument("--size", type=COUNT, default=64, help="shapes: image side in pixels")
  b.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="shapes: dataset seed")
  b.add_argument("--resolution", type=NON_NEGATIVE_INT, default=256,
                 help="warn about images too small for the buckets at this side in px (0: no check)")
  b.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DST")
  b.set_defaults(func=_build)

  e = actions.add_parser("encode", help="encode an image dataset with the VAE into a latent dataset")
  e.add_argument("--src", required=True, help="image dataset directory (from `data build`)")
  e.add_argument("--dst", required=True, help="output directory for the latent dataset")
  e.add_argument("--vae", required=True, help="model directory holding the VAE (nextstep_config.json + vae_params)")
  e.add_argument("--batch", type=COUNT, default=16, help="images per encoder call (per bucket)")
  e.add_argument("--resolution", type=COUNT, default=256, help="side of the square bucket in pixels")
  e.add_argument("--buckets", choices=("aspect", "fixed"), default="aspect", help="aspect-ratio buckets or one square")
  e.add_argument("--min-size-ratio", type=FRACTION, default=1.0,
                 help="skip images smaller than this fraction of their bucket (1.0: never upscale)")
  e.add_argument("--overwrite", action="store_true")
  e.add_argument("--parts", type=NON_NEGATIVE_INT, default=0, help="split the encode into P parts (with --part, or --merge P)")
  e.add_argument("--part", type=NON_NEGATIVE_INT, default=None, help="encode only this part (0..P-1) into DST/parts/; rerun "
                 "a failed part the same way")
  e.add_argument("--merge", type=NON_NEGATIVE_INT, default=0, help="only merge P finished parts in DST into one dataset")
  e.add_argument("--distributed", action="store_true", help="multi-process JAX job: part = jax.process_index() of "
                 "jax.process_count(); process 0 merges (launch/ starts one process per host)")
  e.add_argument("--coordinator", default=None, help="with --distributed off a TPU pod: coordinator host:port")
  e.add_argument("--num-processes", type=COUNT, default=None)
  e.add_argument("--process-id", type=NON_NEGATIVE_INT, default=None)
  e.set_defaults(func=_encode)

  i = actions.add_parser("inspect", help="print the shapes and a decoded row of the first training batches")
  i.add_argument("--config", required=True, help="experiment config file (its `data` section is used)")
  i.add_argument("--batches", type=COUNT, default=1)
  i.add_argument("--chars", type=COUNT, default=400, help="characters of the decoded row to print")
  i.set_defaults(func=_inspect)
  _register_prefs(actions)  # DPO preference pairs (nextstep_jax/apps/preference_pairs.py)


def _local_dst(args) -> None:
  """Datasets and latent-cache parts are written as local files (a temporary sibling renamed into place)."""
  if is_url(args.dst):
    raise ValueError(f"--dst {args.dst}: datasets are written to local paths; mount the bucket on every worker "
                     f"(e.g. gcsfuse at /gcs/BUCKET) and pass the mounted path")


def _build(args) -> int:
  from nextstep_jax.data import wds
  from nextstep_jax.data.builders import build_dataset, open_dataset

  _local_dst(args)

  if args.kind in wds.FOREIGN_KINDS:
    if args.workers:
      if args.kind != "wds":
        raise ValueError(f"--workers (Beam) builds --kind wds only, not {args.kind}")
      from nextstep_jax.data.beam_build import build_wds_beam
      out, counts = build_wds_beam(args.src, args.dst, args.task, args.workers, args.caption_key, args.beam_options,
                                   args.overwrite), None
    else:
      out, counts = wds.build_foreign(args.kind, args.src, args.dst, args.task, args.caption_key, args.image_column,
                                      args.text_column, args.overwrite)
    skipped = "in Beam metrics (nextstep_wds)" if counts is None else wds.summary(counts)
    print(f"wrote {len(open_dataset(out))} records → {out}; skipped: {skipped}")
    return 0
  out = build_dataset(args.kind, args.dst, src=args.src, num=args.num, size=args.size, seed=args.seed,
                      overwrite=args.overwrite, check_resolution=args.resolution)
  print(f"wrote {len(open_dataset(out))} records → {out}")
  return 0


def _encode(args) -> int:
  from nextstep_jax.data import distributed_encode as de
  from nextstep_jax.data.builders import open_dataset
  from nextstep_jax.data.latent_cache import encode_with_model, vae_encoder

  _local_dst(args)
  parted = bool(args.parts) or args.part is not None
  if sum((bool(args.merge), args.distributed, parted)) > 1:
    raise ValueError("--merge P, --distributed and --parts P --part N are separate modes; give one of them")
  if parted and (not args.parts or args.part is None or args.part >= args.parts):
    raise ValueError(f"give --parts P and --part N with 0 <= N < P (got --parts {args.parts} --part {args.part})")
  kw = dict(batch_size=args.batch, resolution=args.resolution, buckets=args.buckets,
            min_size_ratio=args.min_size_ratio)
  if args.merge:
    out, counts = de.merge_parts(args.dst, args.merge)
  else:
    open_dataset(args.src)  # a wrong --src fails here, before the VAE loads
    if args.distributed:
      out, counts = de.encode_distributed(args.src, args.dst, args.vae, args.coordinator, args.num_processes,
                                          args.process_id, progress=False, **kw)
    elif parted:
      out, counts = de.encode_part(args.src, args.dst, *vae_encoder(args.vae), args.part, args.parts, **kw)
    else:
      out, counts = encode_with_model(args.src, args.dst, args.vae, overwrite=args.overwrite, **kw)
  print(f"encoded {counts.get('encoded', 0)} records → {out}; skipped: "
        f"{ {k: v for k, v in counts.items() if k.startswith('skipped/')} or 'none'}")
  return 0


def _inspect(args) -> int:
  from nextstep_jax.config import load_config
  from nextstep_jax.data.iterator import make_train_iterator
  from nextstep_jax.data.interleaved import describe, image_blocks
  from nextstep_jax.tokens import load_tokenizer

  cfg = load_config(args.config, args.config_overrides)
  if "data" not in cfg:
    raise ValueError(f"{args.config} has no `data` section; add one from nextstep_jax.data.config.default_data_config()")
  it = make_train_iterator(cfg.data, 0, 1)
  tok = load_tokenizer(cfg.data.tokenizer)
  for n in range(args.batches):
    batch = next(it)
    print(f"batch {n}: " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in batch.items()))
    row = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    print(f"  row 0 ({len(row)} tokens): {describe(tok, row)[:args.chars]!r}")
    blocks = image_blocks(batch["image_token_grid"][0], batch["image_loss_mask"][0])
    shown = ", ".join(f"{h}×{w}" + ("" if loss else " (no loss)") for h, w, loss in blocks) or "none"
    print(f"  row 0 image blocks: {shown}")
  print(f"stats: {it.stats()}")
  it.close()
  return 0


# ------------------------------------------------------------------------------------- prefs (DPO preference pairs)


def _register_prefs(actions) -> None:
  p = actions.add_parser("prefs", help="make DPO preference pairs: rank a model's samples with a scorer, or import "
                                       "(prompt, chosen, rejected) image files")
  p.add_argument("--dst", required=True, help="output directory (the dataset lands in DST/ns_prefs/1.0.0)")
  p.add_argument("--model", default=None, help="model directory to sample from (params/, vae_params/, tokenizer/)")
  p.add_argument("--prompts", default=None, help="text file, one prompt per line")
  p.add_argument("--shapes", type=NON_NEGATIVE_INT, default=0,
                 help="use N prompts of the shapes world instead of --prompts")
  p.add_argument("--k", type=number(int, lo=2), default=4, help="samples per prompt; best vs worst make the pair")
  p.add_argument("--scorer", default="shapes", help="'shapes' or package.module:function (image_uint8, prompt) -> float")
  p.add_argument("--margin", type=number(float, lo=0), default=0.1,
                 help="keep a pair only if best − worst score >= margin")
  p.add_argument("--size", type=COUNT, default=64, help="sample side in pixels")
  p.add_argument("--steps", type=COUNT, default=20, help="sampling steps")
  p.add_argument("--cfg", type=GUIDANCE, default=3.0, help="classifier-free guidance scale")
  p.add_argument("--sampler", default="sde_a", help="flow sampler (as `nextstep-jax sample --sampler`)")
  p.add_argument("--shift", type=POSITIVE, default=1.0, help="timestep shift")
  p.add_argument("--no-norm", action="store_true", help="do not re-normalise sampled tokens (use_norm off)")
  p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="sampling seed (also the shapes prompt stream)")
  p.add_argument("--prompts-per-call", type=COUNT, default=8, help="prompts per compiled sampling call")
  p.add_argument("--tokens", choices=("encode", "sampled"), default="encode",
                 help="store the VAE encoding of the decoded images, or the sampled tokens")
  p.add_argument("--src", default=None, help="import mode: .jsonl of {prompt, chosen, rejected} image paths")
  p.add_argument("--vae", default=None, help="import mode: model directory whose VAE encodes the images")
  p.add_argument("--resolution", type=COUNT, default=256, help="import mode: square bucket side in pixels")
  p.add_argument("--buckets", choices=("aspect", "fixed"), default="aspect")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=_prefs)


def _prefs(args) -> int:
  from nextstep_jax.apps import preference_pairs as pp

  if args.src:
    if not args.vae:
      raise ValueError("--src (import mode) needs --vae MODEL_DIR to encode the images")
    out, counts = pp.import_prefs(args.src, args.dst, args.vae, args.resolution, args.buckets, args.overwrite)
    print(f"imported {counts.get('pairs', 0)} pairs → {out}; skipped: "
          f"{ {k: v for k, v in counts.items() if k.startswith('skipped/')} or 'none'}")
    return 0
  if not args.model or bool(args.prompts) == bool(args.shapes):
    raise ValueError("give --model MODEL_DIR and exactly one of --prompts FILE / --shapes N (or --src to import)")
  prompts = pp.read_prompts(args.prompts) if args.prompts else pp.shapes_prompts(args.shapes, args.seed)
  from nextstep_jax.sampling.pipeline import Options
  opts = Options(height=args.size, width=args.size, steps=args.steps, cfg=args.cfg, method=args.sampler,
                 shift=args.shift, use_norm=not args.no_norm, seed=args.seed, positive_prompt=None, negative_prompt="")
  settings = pp.PairSettings(k=args.k, margin=args.margin, prompts_per_call=args.prompts_per_call,
                             tokens=args.tokens)
  out, c = pp.make_prefs_from_model(args.model, prompts, args.dst, pp.load_scorer(args.scorer), opts, settings,
                                    args.overwrite)
  pairs = max(c["pairs"], 1)
  print(f"{c['pairs']} pairs from {c['prompts']} prompts ({c['no_margin']} without a {args.margin} score margin) "
        f"→ {out}; mean score {c['score_mean'] / max(c['prompts'], 1):.3f}, chosen {c['score_best'] / pairs:.3f}, "
        f"rejected {c['score_worst'] / pairs:.3f}")
  return 0
