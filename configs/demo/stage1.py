"""The CPU demo (`nextstep-jax demo`): a small NextStep trained from scratch on the synthetic shapes world.

  nextstep-jax demo --workdir /tmp/nextstep_demo                                  # this file, full size
  nextstep-jax demo --workdir /tmp/demo_ci --config configs/demo/stage1.py:ci     # reduced (tests)

`config.model` / `config.vae` / `config.train` / `config.data` are an ordinary experiment, trained by the same
`train()` as every other stage; the demo fills in the paths it creates (`data.sources`, `data.tokenizer`,
`train.vae_from`) with `--config.…` overrides and prints the equivalent `nextstep-jax train` command.
`config.demo` holds what only the demo uses: the dataset, the VAE training, the evaluation sampler.

Geometry: 32×32-px images, an f4 VAE (16 latent channels) and 2×2 patches → a 4×4 grid of 16 image tokens of
64 dims per image (8×8 px each). Text: the byte tokenizer plus one token per word of the shapes world
(`demo.tokenizer = "words"`, nextstep_jax/demo/text.py), so a row is ≤ 33 tokens (`seq_len` 40) — half the
byte-level length, and about half the step time on the CPU.
"""
import ml_collections

from nextstep_jax.config import experiment
from nextstep_jax.data.config import default_data_config
from nextstep_jax.train.config import train_section

IMAGE_SIZE = 32
VAE = dict(resolution=IMAGE_SIZE, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=16)  # f4, ~0.6M params
# vocab: the demo's word tokenizer (config.demo.tokenizer = "words", nextstep_jax.demo.text: 328 tokens)
MODEL = dict(vocab_size=336, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
             head_dim=32, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=256, use_gen_pos_embed=True,
             fm_head_dim=192, fm_head_layers=2,
             fm_head_batch_mul=4,  # official: 4 flow-matching draws per token (docs/DEMO.md: the largest gain)
             lm_loss_weight=0.01, im_loss_weight=1.0,
             # the official training-only input noise (`noise_strength`): the LM learns to continue from imperfect
             # tokens, as it must when sampling (docs/DEMO.md)
             input_noise_strength=0.3,
             # bf16 compute (fp32 master weights; dense layers as bf16 dots with fp32 accumulation on the CPU): faster
             dtype="bfloat16",
             scan_unroll=4)  # straight-line layers: no stacked-residual updates on the CPU

# full demo vs reduced (CI) demo
_SIZES = {
    "full": dict(num_examples=10_000, vae_steps=400, lm_steps=3200, eval_prompts=100),
    "ci": dict(num_examples=2_000, vae_steps=150, lm_steps=600, eval_prompts=128),
}


def get_config(arg=None):
  size = _SIZES[arg or "full"]
  data = default_data_config()
  data.update(dict(
      sources=[dict(name="shapes", path="", weight=1.0, kind="t2i")],  # filled in: WORKDIR/data/latents
      tokenizer="",  # filled in: WORKDIR/vae/tokenizer
      resolution=IMAGE_SIZE, buckets="fixed", down_factor=8, token_dim=64,
      seq_len=40, max_image_tokens=16, pack=False, drop_text_prob=0.15,
      global_batch_size=32, read_buffer_size=64,
      read_threads=1))  # one Grain read thread: the same batches as two, less CPU taken from the train step
  train = train_section(
      steps=size["lm_steps"], lr=3e-3, end_lr=1e-4, warmup_steps=50, schedule="cosine", weight_decay=0.1,
      log_every=25, save_every=250, keep=2, vae_from="")  # vae_from filled in: WORKDIR/vae
  cfg = experiment(MODEL, VAE, train=train, data=data)
  cfg.demo = ml_collections.ConfigDict(dict(
      variant=arg or "full",
      # dataset (nextstep-jax data build --kind shapes)
      num_examples=size["num_examples"], image_size=IMAGE_SIZE, data_seed=0,
      # "words": the byte tokenizer + one token per shapes-world word (nextstep_jax.demo.text; needs
      # model.vocab_size >= 328); "bytes": nextstep_jax.tokens.make_byte_tokenizer (vocab 268)
      tokenizer="words",
      # VAE: Flux architecture from random init, L1 + L2 reconstruction of noise-regularised latents
      vae_steps=size["vae_steps"], vae_batch=16, vae_lr=3e-3, vae_warmup=20, vae_l1=1.0, vae_l2=1.0,
      vae_noise_gamma=0.2, vae_seed=0, vae_save_every=100, vae_log_every=10,
      encode_batch=64,
      # evaluation: held-out prompts (nextstep_jax.data.shapes.held_out_prompts), one image each
      eval_prompts=size["eval_prompts"], eval_seed=1,
      # independent_noise: every prompt its own draws (the official sampler tiles one draw across a batch's prompts,
      # which makes a whole evaluation hinge on a single noise sequence)
      sample=dict(cfg=3.0, steps=50, method="sde_a", shift=1.0, use_norm=True, cfg_schedule="constant", seed=0,
                  independent_noise=True),
      baseline=True,  # also sample the untrained model (zero steps, same VAE and sampler) as the chance level
      grid_cols=10, grid_scale=2,
  ))
  return cfg
