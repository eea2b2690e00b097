"""`data build --kind wds --workers W`: the build on Apache Beam through TFDS's Beam support.

The builder's `_generate_examples` is a Beam PTransform: the shard list is a PCollection, each element (one tar
shard) is read and turned into records by `wds.shard_examples` on whichever worker gets it, TFDS's Beam writer
sorts by key and writes the ArrayRecord shards from the workers, then writes dataset_info.json (the one
metadata step). Keys are shard index · 10⁹ + sample index, so the record order — and with it every record index
the pipeline and its warnings use — does not depend on W or on how the runner split the work. A failed bundle is
retried by the runner; the rest is not redone.

Runners: DirectRunner with `direct_num_workers=W` processes here; `--beam-options` adds or overrides flags, e.g.
`--beam-options='--runner=DataflowRunner --project=… --region=… --temp_location=gs://…'` (or Flink/Spark; not
run here). Shards and the output are opened as local paths, so on a cluster they must be a mount every worker
sees (gcsfuse, NFS). The dataset is built in a temporary sibling and renamed into place
(`builders.build_atomically`); a build whose every sample is skipped leaves nothing. Skipped samples are counted
in Beam metrics (`nextstep_wds` namespace, one counter per reason) and logged by each worker.
"""
from __future__ import annotations

import os
import shlex
from typing import Iterator

import tensorflow_datasets as tfds

from nextstep_jax.data import builders, wds


_NO_EXAMPLES = "number of generated examples is 0"


def _shard_records(item: tuple[int, str], task: str, caption_key: str) -> Iterator[tuple[int, dict]]:
  import apache_beam as beam

  index, shard = item
  counts = wds.SkipCounter()
  yield from wds.shard_examples(shard, index, task, counts, caption_key)
  for reason, n in counts.items():
    beam.metrics.Metrics.counter("nextstep_wds", reason).inc(n)


def _beam_builder(name: str):
  base = builders.BUILDERS[name]  # noqa: SLF001 (the builder table of this package)

  class BeamBuilder(base, skip_registration=True):
    def __init__(self, *, shards: list[str], task: str, caption_key: str, **kwargs):
      self._shards, self._task, self._caption_key = shards, task, caption_key
      super().__init__(examples=None, **kwargs)

    def _generate_examples(self):
      import apache_beam as beam

      return (beam.Create(list(enumerate(self._shards)))
              | "reshuffle shards" >> beam.Reshuffle()
              | "read shards" >> beam.FlatMap(_shard_records, task=self._task, caption_key=self._caption_key))

  BeamBuilder.name = name
  return BeamBuilder


def beam_options(workers: int, extra: str = "") -> list[str]:
  """DirectRunner flags for `workers` local processes, then `extra` (shell-quoted flags) on top."""
  flags = [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
  return flags + shlex.split(extra)


def build_wds_beam(src: str, dst: str | os.PathLike, task: str = "auto", workers: int = 2, caption_key: str = "caption",
                   extra_options: str = "", overwrite: bool = False) -> str:
  """Builds official WebDataset shards at `src` with Beam; returns the dataset's version directory."""
  try:
    import apache_beam  # noqa: F401
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError:
    raise builders.DatasetError("--workers needs Apache Beam, in its own environment (it pins older pillow / "
                                "protobuf / pyarrow): pip install -c constraints-beam.txt -e '.[beam]'") from None
  if workers <= 0:
    raise builders.DatasetError(f"--workers must be positive, got {workers}")
  shards = [os.path.abspath(s) for s in wds.expand_shards(src)]
  task = wds.resolve_task(task, shards, caption_key)
  name = wds.TASK_BUILDERS[task]
  options = PipelineOptions(beam_options(workers, extra_options))
  written: list[int] = []

  def build(data_dir: str) -> None:
    builder = _beam_builder(name)(shards=shards, task=task, caption_key=caption_key, data_dir=data_dir,
                                  file_format="array_record")
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(beam_options=options))
    except Exception as e:
      if _NO_EXAMPLES in str(e):  # TFDS's writer refuses an empty split (inside a Beam stage's error)
        written.append(0)
      raise
    written.append(builder.info.splits[builders.SPLIT].num_examples)
  try:
    return builders.build_atomically(name, dst, build, lambda: written[0] if written else None, overwrite)
  except builders.EmptyDatasetError:
    raise builders.EmptyDatasetError(
        f"--src {src}: every sample was skipped (per-reason counts: the workers' `nextstep_wds` metrics and "
        f"warnings); nothing was written to {dst} — check --task / --caption-key or the shards") from None
