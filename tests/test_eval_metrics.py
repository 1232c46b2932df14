"""SID-evaluation metrics (mllm_jax.eval.metrics) against hand-computed values and MiniOneRec's calc.py."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from conftest import SHARED_DATA

from mllm_jax.data import sid
from mllm_jax.eval.metrics import CALC_TOPK, ranking_metrics, write_eval_files

AMAZON = SHARED_DATA / "MiniOneRec" / "data" / "Amazon"
INDEX = AMAZON / "index" / "Industrial_and_Scientific.index.json"
INFO = AMAZON / "info" / "Industrial_and_Scientific_5_2016-10-2018-11.txt"

A, B, C, D, E, F = (f"<a_{i}><b_{i}><c_{i}>" for i in range(1, 7))
VALID = {A, B, C, D, E, F}


def test_hand_computed_example():
    predictions = [
        [A, "junk", B, C, D],         # hit at rank 0; "junk" comes after the hit: not counted
        [B, B, '"' + C + '"', D, E],  # hit at rank 2 (a duplicate before it; quotes are stripped)
        ["bad", B, D, E, " " + F + "\n"],  # hit at rank 4; one invalid before it
        [B, "x", D, "y", E],          # a miss: both invalid predictions count
    ]
    targets = [A, C + "\n", F, A]
    m = ranking_metrics(predictions, targets, ks=[1, 3, 5], valid=VALID)
    assert set(m) == {"hr@1", "hr@3", "hr@5", "ndcg@1", "ndcg@3", "ndcg@5", "invalid_prediction_count"}
    # ranks 0, 2, 4, miss over 4 samples
    assert m["hr@1"] == 0.25 and m["hr@3"] == 0.5 and m["hr@5"] == 0.75
    # NDCG = mean of 1/log2(rank + 2): 1/log2(2) = 1, 1/log2(4) = 0.5, 1/log2(6) = 0.386852807...
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    assert m["ndcg@3"] == pytest.approx((1 + 0.5) / 4)
    assert m["ndcg@5"] == pytest.approx((1 + 0.5 + 0.38685280723454163) / 4)
    assert m["ndcg@5"] == pytest.approx(0.4717132018086354)
    assert m["invalid_prediction_count"] == 3


def test_all_hits_and_all_misses():
    perfect = ranking_metrics([[A, B], [B, A]], [A, B], ks=[1, 2], valid=VALID)
    assert perfect == {"hr@1": 1.0, "ndcg@1": 1.0, "hr@2": 1.0, "ndcg@2": 1.0, "invalid_prediction_count": 0}
    none = ranking_metrics([[B, C], [C, D]], [A, A], ks=[2], valid=VALID)
    assert none == {"hr@2": 0.0, "ndcg@2": 0.0, "invalid_prediction_count": 0}


def test_k_must_not_exceed_the_number_of_beams():
    preds = [[A, B, C], [B, A, C]]
    assert ranking_metrics(preds, [A, A], ks=[3], valid=VALID)["hr@3"] == 1.0
    for bad in (4, 0, -1, 2.0):
        with pytest.raises(ValueError, match="number of beams"):
            ranking_metrics(preds, [A, A], ks=[1, bad], valid=VALID)
    with pytest.raises(ValueError, match="no samples"):
        ranking_metrics([], [], ks=[1], valid=VALID)
    with pytest.raises(ValueError):
        ranking_metrics(preds, [A], ks=[1], valid=VALID)


def calc_py(path: str, item_path: str) -> dict:
    """MiniOneRec calc.py's `calculate_recommendation_metrics` for one result file, transcribed (prints
    replaced by a returned dict): reads the predictions JSON and the item catalog `.txt`."""
    item_path = item_path.removesuffix(".txt")
    unknown_items_count = 0
    with open(f"{item_path}.txt") as f:
        items = f.readlines()
    item_names = [_.split("\t")[0].strip() for _ in items]
    item_dict = {}
    for i, name in enumerate(item_names):
        item_dict.setdefault(name, []).append(i)
    topk_list = [1, 3, 5, 10, 20, 50]
    n_beam = -1
    with open(path) as f:
        test_data = json.load(f)
    text = [[_.strip("\"\n").strip() for _ in sample["predict"]] for sample in test_data]
    for index, sample in enumerate(text):
        if n_beam == -1:
            n_beam = len(sample)
            valid_topk = [k for k in topk_list if k <= n_beam]
            ALLNDCG = np.zeros(len(valid_topk))
            ALLHR = np.zeros(len(valid_topk))
        if type(test_data[index]["output"]) == list:
            target_item = test_data[index]["output"][0].strip("\"").strip(" ")
        else:
            target_item = test_data[index]["output"].strip(" \n\"")
        minID = 1000000
        for i in range(len(sample)):
            if sample[i] not in item_dict:
                unknown_items_count += 1
            if sample[i] == target_item:
                minID = i
                break
        for index, topk in enumerate(topk_list):
            if topk > n_beam:
                continue
            if minID < topk:
                ALLNDCG[index] = ALLNDCG[index] + (1 / math.log(minID + 2))
                ALLHR[index] = ALLHR[index] + 1
    ndcg = ALLNDCG / len(text) / (1.0 / math.log(2))
    hr = ALLHR / len(text)
    return {"ks": valid_topk, "ndcg": ndcg.tolist(), "hr": hr.tolist(), "unknown": unknown_items_count}


@pytest.mark.parametrize("n_beam", [50, 12])
def test_agrees_with_calc_py_on_a_predictions_file(tmp_path, n_beam):
    assert INFO.is_file() and INDEX.is_file(), f"shared data missing under {AMAZON}"
    catalog = sorted({"".join(t) for t in sid.load_index(str(INDEX)).values()})
    valid = set(catalog)  # the index's SIDs: the same set as the first column of calc.py's info file
    rng = random.Random(n_beam)
    predictions, targets = [], []
    for n in range(400):
        target = rng.choice(catalog)
        beams = rng.sample(catalog, n_beam)
        beams = [b for b in beams if b != target][: n_beam - 1] + [rng.choice(catalog)]
        rng.shuffle(beams)
        roll = rng.random()
        if roll < 0.6:  # a hit at a random rank, sometimes preceded by a duplicate of it
            pos = rng.randrange(n_beam)
            beams[pos] = target
            if pos and rng.random() < 0.2:
                beams[pos - 1] = beams[pos]
        for i in range(n_beam):  # some invalid or messy predictions anywhere
            r = rng.random()
            if r < 0.03:
                beams[i] = rng.choice(["<a_1><b_2>", "", "garbage", "<a_999><b_999><c_999>"])
            elif r < 0.06:
                beams[i] = rng.choice(['"{}"', " {}\n", "{} ", "\n{}\n"]).format(beams[i])
        predictions.append(beams)
        targets.append(target + ("\n" if n % 3 == 0 else ""))  # MiniOneRec's "output" ends with "\n"

    preds_path, _ = write_eval_files(tmp_path, predictions, targets, {}, step=None)
    ref = calc_py(str(preds_path), str(INFO))
    assert ref["ks"] == [k for k in CALC_TOPK if k <= n_beam]
    ours = ranking_metrics(predictions, targets, ks=ref["ks"], valid=valid)
    # the same operations in the same order: equal to the last bit
    assert [ours[f"hr@{k}"] for k in ref["ks"]] == ref["hr"]
    assert [ours[f"ndcg@{k}"] for k in ref["ks"]] == ref["ndcg"]
    assert ours["invalid_prediction_count"] == ref["unknown"] > 0
    assert 0 < ours[f"hr@{ref['ks'][-1]}"] < 1
    # metrics from the file itself agree too
    records = json.loads(preds_path.read_text())
    again = ranking_metrics([r["predict"] for r in records], [r["output"] for r in records], ref["ks"], valid)
    assert again == ours


def test_write_eval_files(tmp_path):
    metrics = ranking_metrics([[A, B], [C, A]], [A, A], ks=[1, 2], valid=VALID)
    preds_path, metrics_path = write_eval_files(tmp_path / "run", [[A, B], [C, A]], [A, A], metrics, step=7)
    assert preds_path.name == "eval_predictions.json" and metrics_path.name == "eval_metrics.json"
    assert json.loads(preds_path.read_text()) == [{"output": A, "predict": [A, B]}, {"output": A, "predict": [C, A]}]
    summary = json.loads(metrics_path.read_text())
    assert summary == {**metrics, "step": 7, "num_samples": 2}
    assert summary["hr@1"] == 0.5 and summary["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    write_eval_files(tmp_path / "run", [[A]], [A], {"hr@1": 1.0}, step=None)
    assert json.loads(metrics_path.read_text()) == {"hr@1": 1.0, "step": None, "num_samples": 1}
