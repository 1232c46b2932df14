"""Character-level text data (Tiny Shakespeare by default), as in nanoGPT's shakespeare_char.

Batches are a pure function of (seed, step): a resumed run sees exactly the data the
uninterrupted run would have, and evaluation draws from its own stream so that it never
changes which training batches come next.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllm_jax.config import ConfigError, read_text_file
from mllm_jax.contracts import cache_dir

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9  # nanoGPT's split: first 90% train, last 10% validation
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclass
class CharDataConfig:
    path: str | None = None
    """A UTF-8 text file; None downloads Tiny Shakespeare (sha256-checked) into the cache."""

    def validate(self) -> None:
        if self.path is not None and not Path(self.path).is_file():
            raise ConfigError(f"data.path: file not found: {self.path}")


def download(url: str, dest: Path, sha256: str) -> Path:
    """Fetch `url` to `dest` once; a cached or fresh file whose sha256 differs is an error."""
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, tmp)
            except OSError as e:  # URLError included: no network, DNS, HTTP errors
                os.unlink(tmp.name)
                reason = getattr(e, "reason", None) or e
                raise ConfigError(f"data.path: not given, and downloading {url} failed ({reason}); "
                                  "give a local copy with --set data.path=FILE") from None
        os.replace(tmp.name, dest)  # atomic: a crash never leaves half a file in the cache
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    if digest != sha256:
        raise ConfigError(f"{dest}: sha256 {digest} does not match the expected {sha256}; delete it and retry")
    return dest


def read_text(path: str | Path) -> str:
    """The corpus file as text; a binary or empty file is refused."""
    try:
        text = read_text_file(path)
    except ConfigError as e:
        raise ConfigError(f"data.path: {e}; expected a text file") from None
    if not text:
        raise ConfigError(f"data.path: {path} is empty; expected a text file")
    return text


class CharDataset:
    """The whole corpus as token ids in memory (a few MB), with its character vocabulary."""

    def __init__(self, path: str | None, block_size: int):
        if path is None:
            path = download(TINY_SHAKESPEARE_URL, cache_dir() / "tinyshakespeare" / "input.txt",
                            TINY_SHAKESPEARE_SHA256)
        text = read_text(path)
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = np.array([self.stoi[c] for c in text], dtype=np.int32)
        n = int(len(ids) * TRAIN_FRACTION)
        self.splits = {"train": ids[:n], "val": ids[n:]}
        self.block_size = block_size
        for name, split in self.splits.items():
            if len(split) <= block_size:
                raise ConfigError(
                    f"data.path: the {name} split of {path} ({'first 90%' if name == 'train' else 'last 10%'}) "
                    f"has {len(split)} characters, fewer than model.block_size + 1 = {block_size + 1}"
                )

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text if c in self.stoi]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def batch(self, split: str, seed: int, index: int, batch_size: int, rows: slice) -> dict[str, np.ndarray]:
        """Rows `rows` of batch number `index` of `split`: inputs x and next-token targets y."""
        stream = _TRAIN_STREAM if split == "train" else _EVAL_STREAM
        data = self.splits[split]
        rng = np.random.default_rng([seed, stream, index])
        starts = rng.integers(0, len(data) - self.block_size, size=batch_size)[rows]
        window = data[starts[:, None] + np.arange(self.block_size + 1)]
        return {"x": window[:, :-1], "y": window[:, 1:]}
