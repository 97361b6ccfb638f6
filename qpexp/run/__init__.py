"""One run: the pipeline, its stage cache, config schema and model building, and the DDP ranks."""
