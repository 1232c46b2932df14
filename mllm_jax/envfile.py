"""`.env` files (KEY=VALUE lines): how W&B keys reach a run without touching a command line."""

from __future__ import annotations

import io
import os
from pathlib import Path

from dotenv import dotenv_values

from mllm_jax.config import read_text_file


def load_env_file(path: str | Path) -> list[str]:
    """Put the file's variables into os.environ, never overriding one that is already set.

    A binary file is a ConfigError. Accepts `export KEY=VALUE`, single or double quotes, comments and CRLF line ends (the
    parsing is python-dotenv's). Returns the key names that were set; values are never
    returned or printed, since they are secrets.
    """
    loaded = []
    for key, value in dotenv_values(stream=io.StringIO(read_text_file(path)), interpolate=False).items():
        if value is not None and key not in os.environ:
            os.environ[key] = value
            loaded.append(key)
    return loaded
