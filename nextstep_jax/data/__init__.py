"""Data: synthetic shapes, TFDS ArrayRecord builders, Grain pipelines, buckets and packing, latent caching."""
