"""mllm-jax trainer: JAX/Flax/Optax recipes that run the same on a laptop CPU and a TPU slice."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mllm-jax")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0.0.0+src"
