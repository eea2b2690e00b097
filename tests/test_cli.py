"""CLI commands end to end on the converted fixture: convert nextstep (+ export), sample (t2i, edit), bad input."""
import os

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.cli import main


@pytest.fixture(scope="module")
def model_dir(fixtures_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("cli") / "model"
  assert main(["convert", "nextstep", "--src", fixtures_dir, "--dst", str(out)]) == 0
  return out


def test_sample_text_to_image_writes_pngs(model_dir, tmp_path, capsys):
  out = tmp_path / "out.png"
  assert main(["sample", "--checkpoint", str(model_dir), "--prompt", "a red cube", "--prompt", "a cat",
               "--size", "16x32", "--steps", "3", "--cfg", "2", "--positive-prompt", "", "--negative-prompt", "",
               "--out", str(out)]) == 0
  text = capsys.readouterr().out
  assert "compile" in text and "image tokens/s" in text
  for i in range(2):
    img = np.asarray(Image.open(tmp_path / f"out_{i}.png"))
    assert img.shape == (16, 32, 3)


def test_sample_with_a_log_prob_sampler(model_dir, tmp_path):
  """GRPO's rollout samplers are reachable from the CLI (same program, different per-step transition)."""
  for method in ("cps", "flow_sde"):
    out = tmp_path / f"{method}.png"
    assert main(["sample", "--checkpoint", str(model_dir), "--prompt", "a red cube", "--size", "16x16", "--steps", "3",
                 "--sampler", method, "--noise-level", "0.5", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out)).shape == (16, 16, 3)


def test_sample_editing(model_dir, fixtures_dir, tmp_path):
  src = np.load(os.path.join(fixtures_dir, "sample_edit.npz"))["source_image_uint8"]
  Image.fromarray(src).save(tmp_path / "src.png")
  assert main(["sample", "--checkpoint", str(model_dir), "--prompt", "<image>make it blue", "--image",
               str(tmp_path / "src.png"), "--size", "16x16", "--steps", "3", "--out", str(tmp_path / "e.png")]) == 0
  assert np.asarray(Image.open(tmp_path / "e.png")).shape == (16, 16, 3)


@pytest.mark.parametrize("args,message", [
    (["--size", "18x16"], "not a multiple of 4"),
    (["--size", "big"], "must look like 512x512"),
    (["--cfg", "0.5"], "argument --cfg: 0.5 must be ≥ 1"),
    (["--prompt", "<image> make it blue"], "no --image was given"),
    (["--sampler", "cps", "--noise-level", "1.5"], "noise_level=1.5 must be in (0, 1]"),
])
def test_sample_bad_input(model_dir, tmp_path, capsys, args, message):
  base = ["sample", "--checkpoint", str(model_dir), "--prompt", "x", "--steps", "2", "--size", "16x16",
          "--out", str(tmp_path / "o.png")]
  assert main(base + args) == 2
  assert message in capsys.readouterr().err


def test_missing_checkpoint(tmp_path, capsys):
  assert main(["sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
  assert "not a nextstep_jax model directory" in capsys.readouterr().err


def test_export_nextstep_round_trip(model_dir, fixtures_dir, tmp_path):
  from safetensors.numpy import load_file
  assert main(["convert", "export-nextstep", "--src", str(model_dir), "--dst", str(tmp_path / "rel")]) == 0
  assert (tmp_path / "rel" / "vae" / "config.json").is_file() and (tmp_path / "rel" / "tokenizer.json").is_file()
  src = load_file(os.path.join(fixtures_dir, "vae", "model.safetensors"))
  got = load_file(str(tmp_path / "rel" / "vae" / "model.safetensors"))
  assert set(src) <= set(got) and all(src[k].tobytes() == got[k].tobytes() for k in src)
  # the exported release converts again
  assert main(["convert", "nextstep", "--src", str(tmp_path / "rel"), "--dst", str(tmp_path / "again")]) == 0
