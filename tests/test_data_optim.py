"""Char data (download, cache, checksum, deterministic batches) and the optimizer pieces."""

from __future__ import annotations

import hashlib
import http.server
import math
import threading
from functools import partial

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import SHAKESPEARE
from mllm_jax import optim
from mllm_jax.config import ConfigError
from mllm_jax.data.char import TINY_SHAKESPEARE_SHA256, CharDataset, download


@pytest.fixture()
def http_dir(tmp_path):
    """A real HTTP server on loopback serving a copy of Tiny Shakespeare; counts requests."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "input.txt").write_bytes(SHAKESPEARE.read_bytes())
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_download_checks_sha256_and_caches(tmp_path, http_dir):
    base, hits = http_dir
    dest = tmp_path / "cache" / "input.txt"
    assert download(f"{base}/input.txt", dest, TINY_SHAKESPEARE_SHA256) == dest
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == TINY_SHAKESPEARE_SHA256
    download(f"{base}/input.txt", dest, TINY_SHAKESPEARE_SHA256)
    assert len(hits) == 1, "the second call must use the cache"
    with pytest.raises(ConfigError, match="does not match the expected"):
        download(f"{base}/input.txt", tmp_path / "other" / "input.txt", "0" * 64)
    # No network (or a 404): one line that says what to do, and no half file left in the cache.
    for url in (f"{base}/missing.txt", "http://no-such-host.invalid/input.txt"):
        with pytest.raises(ConfigError, match=r"^data.path: not given, and downloading .* failed \(.+\); give a "
                                              r"local copy with --set data.path=FILE$"):
            download(url, tmp_path / "offline" / "input.txt", TINY_SHAKESPEARE_SHA256)
        assert not list((tmp_path / "offline").iterdir())


def test_dataset_split_vocab_and_batches():
    ds = CharDataset(str(SHAKESPEARE), block_size=64)
    assert ds.vocab_size == 65
    assert (len(ds.splits["train"]), len(ds.splits["val"])) == (1_003_854, 111_540)
    assert ds.decode(ds.encode("First Citizen")) == "First Citizen"
    full = ds.batch("train", seed=1, index=5, batch_size=8, rows=slice(0, 8))
    assert full["x"].shape == (8, 64) and np.array_equal(full["x"][:, 1:], full["y"][:, :-1])
    # Same (seed, index) -> same batch; each process's rows are its slice of the global batch.
    half = ds.batch("train", seed=1, index=5, batch_size=8, rows=slice(4, 8))
    assert np.array_equal(half["x"], full["x"][4:])
    assert not np.array_equal(ds.batch("train", 1, 6, 8, slice(0, 8))["x"], full["x"])
    # Validation draws from its own stream and its own text.
    val = ds.batch("val", seed=1, index=5, batch_size=8, rows=slice(0, 8))
    assert not np.array_equal(val["x"], full["x"])


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_sft_schedules_are_hugging_faces(kind):
    """sft's schedules equal transformers' get_{linear,cosine}_schedule_with_warmup at every update
    (linear is sft's default: MiniOneRec's sft.py trains with the Trainer's default)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from mllm_jax.recipes.sft import TrainConfig

    assert TrainConfig().lr_schedule == "linear"
    lr, warmup, total = 3e-4, 5, 40
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    make = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
    hf = make(opt, warmup, total)
    want = []
    for _ in range(total + 1):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    ours = optim.warmup_decay(lr, warmup, total, kind)
    np.testing.assert_allclose([float(ours(s)) for s in range(total + 1)], want, rtol=1e-5, atol=1e-12)


def test_schedule_is_nanogpts():
    lr, min_lr, warmup, decay = 1e-3, 1e-4, 100, 2000
    schedule = optim.warmup_cosine(lr, min_lr, warmup, decay)

    def nanogpt(it):  # karpathy/nanoGPT train.py get_lr
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    for it in [0, 1, 50, 99, 100, 101, 700, 1999, 2000, 2500]:
        assert float(schedule(it)) == pytest.approx(nanogpt(it), rel=1e-5), it


def test_weight_decay_only_on_matrices():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    tx = optim.adamw(optax.constant_schedule(0.1), 0.9, 0.99, weight_decay=0.5, grad_clip=1.0)
    zero = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
    updates, _ = tx.update(zero, tx.init(params), params)
    # With zero gradients only decoupled weight decay moves a parameter: lr * wd * p.
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], np.zeros(2))
