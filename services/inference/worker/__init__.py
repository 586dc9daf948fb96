"""The inference worker process: the base model, the adapter cache and the generation task."""
