"""Small WebDataset shards in the official NextStep layout (`key.json` + `key-{i}.png`), written with the
`webdataset` package's TarWriter as the official `build_wds.py` does; shared by the wds / beam / mixture tests."""
import io
import json

import numpy as np
import webdataset
from PIL import Image


def _png(h, w, seed):
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def write_tar(path, samples):
  """samples: (key, json dict or raw bytes, [image (h, w) or raw bytes], single-image style)."""
  with webdataset.TarWriter(str(path)) as sink:
    for n, (key, meta, images, single) in enumerate(samples):
      sink.write({"__key__": key, "json": meta if isinstance(meta, bytes) else json.dumps(meta).encode()})
      for i, im in enumerate(images):
        data = im if isinstance(im, bytes) else _png(*im, seed=100 * n + i)
        sink.write({"__key__": key if single else f"{key}-{i}", "png": data})


SOURCES = {
    "text": [("t0", {"text": "plain text one"}, [], False), ("t1", {"text": "second document"}, [], False)],
    "t2i": [("a0", {"caption": "a red square"}, [(64, 64)], False),
            ("a1", {"caption": "a wide blue field"}, [(48, 96)], True),  # key.png style
            ("a2", b"{not json", [(64, 64)], False),  # broken JSON → skipped at build
            ("a3", {"caption": "a tall green tree"}, [b"not an image"], False)],  # unreadable → skipped at encode
    "edit": [("e0", {"caption": "<image_0>make it blue<image_1>"}, [(64, 64), (64, 64)], False),
             ("e1", {"caption": "a cat <image_0> turn the cat around<image_1>"}, [(48, 96), (48, 96)], False)],
    "interleave": [("i0", {"caption": "step one <image_0> then <image_1> finally <image_2> done"},
                    [(64, 64), (48, 96), (96, 48)], False),
                   ("i1", {"caption": "<image_0> and <image_1>"}, [(96, 48), (64, 64)], False),
                   ("i2", {"caption": "missing <image_0> and <image_2>"}, [(64, 64), (64, 64)], False)],
}


def write_shards(root, sources, shards_per_task=2):
  """root/<task>/0000i.tar for every task of `sources` (samples split evenly over the shards)."""
  for task, samples in sources.items():
    (root / task).mkdir(parents=True)
    step = -(-len(samples) // shards_per_task)
    for j in range(shards_per_task):
      write_tar(root / task / f"{j:05d}.tar", samples[j * step:(j + 1) * step])
