"""The SID evaluation both recipes run (sft with run_mode train_eval/eval, rl at every eval):
MiniOneRec's next-item test prompts through the constrained beam search, HR@K / NDCG@K as its
calc.py computes them, the predictions written to the run dir."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from mllm_jax import runtime
from mllm_jax.config import ConfigError, PositiveInt
from mllm_jax.eval.beam_search import BeamSearch, left_pad
from mllm_jax.eval.metrics import ranking_metrics, write_eval_files

PROMPT_MULTIPLE = 64
"""Prompts of an evaluation batch are left-padded to a multiple of this: one compile per length."""


@dataclass
class SidEvalConfig:
    """The SID evaluation: constrained beam search over the index's SIDs on data.test_file."""

    num_beams: PositiveInt = 50
    topk: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50])
    """K of HR@K and NDCG@K; each <= num_beams."""
    per_device_batch_size: PositiveInt = 1
    """Prompts per data-parallel device in one beam search (each carries num_beams sequences)."""

    def validate(self) -> None:
        if not self.topk or any(k < 1 or k > self.num_beams for k in self.topk):
            raise ConfigError(f"eval.topk: expected values in 1..num_beams={self.num_beams}, got {self.topk}")

    def metrics(self) -> list[str]:
        """The names `evaluate_sids` reports (what a train.best_metric may name)."""
        return [f"eval/{kind}@{k}" for kind in ("hr", "ndcg") for k in self.topk]

    def check_selects(self, best_metric: str) -> None:
        """A train.best_metric this evaluation produces, refused before the run starts otherwise."""
        if best_metric not in self.metrics():
            raise ConfigError(f"train.best_metric {best_metric}: the SID evaluation reports "
                              f"{', '.join(self.metrics())} (eval.topk {self.topk})")


def padded_length(n: int, multiple: int = PROMPT_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def index_batches(n: int, size: int) -> list[np.ndarray]:
    """0..n-1 in rows of `size`, the last row padded with -1 (an empty filler)."""
    order = np.concatenate([np.arange(n), np.full(-n % size, -1)])
    return list(order.reshape(-1, size))


def evaluate_sids(search: BeamSearch, params, prompts: list[np.ndarray], targets: list[str], cfg: SidEvalConfig,
                  mesh: jax.sharding.Mesh, pad_id: int, run_dir: Path, step: int) -> dict[str, float]:
    """Constrained beam search over every test prompt (token ids) and MiniOneRec's metrics of the
    beams against `targets`: each process feeds its rows of each batch, every process gathers all
    beams, process 0 writes eval_predictions.json and eval_metrics.json into `run_dir`. Returns
    {"eval/hr@K", "eval/ndcg@K", "eval/invalid_prediction_count"}."""
    size = cfg.per_device_batch_size * runtime.data_parallel_size(mesh)
    rows = runtime.process_rows(size)
    predictions: list[list[str]] = []
    for idx in index_batches(len(prompts), size):
        length = padded_length(max(len(prompts[i]) for i in idx if i >= 0))
        local = [prompts[max(i, 0)] for i in idx[rows]]  # a filler row repeats prompt 0; dropped below
        ids, mask = left_pad(local, length, pad_id)
        batch = runtime.to_global({"ids": ids, "mask": mask}, mesh, size)
        tokens, _ = search(params, batch["ids"], batch["mask"])
        tokens = runtime.to_host(tokens)
        predictions += [[search.trie.decode(b) for b in tokens[r]] for r, i in enumerate(idx) if i >= 0]
    result = ranking_metrics(predictions, targets, cfg.topk, search.trie.valid)
    if jax.process_index() == 0:
        write_eval_files(run_dir, predictions, targets, result, step)
    return {f"eval/{k}": float(v) for k, v in result.items()}
