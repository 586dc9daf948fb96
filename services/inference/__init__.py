"""The inference service: one base model, many hot-swapped LoRA adapters, generation jobs."""
