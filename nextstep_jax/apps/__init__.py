"""Applications built from the library's parts (sample → score → write pipelines), below the CLI commands."""
