"""mllm: the laptop-side launcher. It never imports JAX; it meets the trainer only through a
command line, environment variables and a run directory (docs/contracts.md)."""
