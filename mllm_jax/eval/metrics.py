"""HR@K / NDCG@K of SID predictions, computed exactly as MiniOneRec's `calc.py`
(`calculate_recommendation_metrics`), and the files a SID evaluation writes.

calc.py's semantics, per sample (predictions best first):

- a prediction is cleaned with `.strip('"\\n').strip()`, the target with `.strip(' \\n"')`;
- rank = the index of the first prediction equal to the target (duplicates change nothing but the
  slots they take); no hit = a miss at every K;
- HR@K = (number of samples with rank < K) / number of samples;
- NDCG@K = sum over those samples of 1/ln(rank + 2), / number of samples / (1 / ln 2), i.e. the mean of
  1/log2(rank + 2) (one relevant item, so IDCG = 1), summed in sample order like calc.py;
- invalid_prediction_count = predictions not in the valid set (the item SIDs; calc.py's info file),
  counted like calc.py: only up to and including the hit, all of them when there is none;
- K must be <= the number of beams, which calc.py takes from the first sample (it drops larger K).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

CALC_TOPK = (1, 3, 5, 10, 20, 50)
"""calc.py's K list (it keeps those <= the number of beams)."""


def _clean_prediction(text: str) -> str:
    return text.strip('"\n').strip()


def _clean_target(text: str) -> str:
    return text.strip(' \n"')


def ranking_metrics(predictions: list[list[str]], targets: list[str], ks: list[int],
                    valid: set[str]) -> dict[str, float]:
    """`{"hr@K": ..., "ndcg@K": ... for K in ks, "invalid_prediction_count": n}` (see the module doc).

    Raises ValueError on no samples, a length mismatch, or a K outside 1..number of beams."""
    if not predictions:
        raise ValueError("ranking_metrics: no samples")
    if len(predictions) != len(targets):
        raise ValueError(f"ranking_metrics: {len(predictions)} prediction lists for {len(targets)} targets")
    n_beam = len(predictions[0])
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_beam:
            raise ValueError(f"ranking_metrics: K={k!r} must be an integer in 1..{n_beam} (the number of beams)")
    ks = list(dict.fromkeys(ks))
    ndcg = dict.fromkeys(ks, 0.0)
    hits = dict.fromkeys(ks, 0)
    invalid = 0
    for beams, raw_target in zip(predictions, targets):
        target = _clean_target(raw_target)
        rank = None
        for i, raw in enumerate(beams):
            pred = _clean_prediction(raw)
            if pred not in valid:
                invalid += 1
            if pred == target:
                rank = i
                break
        if rank is None:
            continue
        for k in ks:
            if rank < k:
                ndcg[k] += 1 / math.log(rank + 2)
                hits[k] += 1
    n = len(predictions)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hits[k] / n
        out[f"ndcg@{k}"] = ndcg[k] / n / (1.0 / math.log(2))
    out["invalid_prediction_count"] = invalid
    return out


def write_eval_files(run_dir: Path, predictions: list[list[str]], targets: list[str], metrics: dict,
                     step: int | None) -> tuple[Path, Path]:
    """Write `eval_predictions.json` (`[{"output": target, "predict": [best first, ...]}]`, the file
    calc.py reads) and `eval_metrics.json` (`metrics` + `step` + `num_samples`) into `run_dir`."""
    if len(predictions) != len(targets):
        raise ValueError(f"write_eval_files: {len(predictions)} prediction lists for {len(targets)} targets")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    preds_path, metrics_path = run_dir / "eval_predictions.json", run_dir / "eval_metrics.json"
    records = [{"output": t, "predict": list(p)} for p, t in zip(predictions, targets)]
    preds_path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = {**metrics, "step": step, "num_samples": len(predictions)}
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return preds_path, metrics_path
