"""MiniOneRec's RL prompts (mllm_jax.data.sid_rl) against a port of its datasets, on the shared
Industrial_and_Scientific data (valid is the train file: the shared data has no train split)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import INDUSTRIAL_INDEX, INDUSTRIAL_ITEMS, INDUSTRIAL_VALID
from tokenizers import AddedToken

import minionerec_ref as ref
from mllm_jax.config import ConfigError
from mllm_jax.data import sid, sid_rl
from mllm_jax.models.tiny import EOS_TOKEN, build_tokenizer

ALL = sid_rl.RlTasksConfig()


def config(**kw) -> sid_rl.RlDataConfig:
    paths = {"train_file": INDUSTRIAL_VALID, "sid_index_path": INDUSTRIAL_INDEX, "item_meta_path": INDUSTRIAL_ITEMS}
    return sid_rl.RlDataConfig(**{**{k: str(v) for k, v in paths.items()}, **kw})


def only(*names: str) -> sid_rl.RlTasksConfig:
    return sid_rl.RlTasksConfig(**{t: t in names for t in sid_rl.RL_TASKS})


def by_task(prompts: list[sid_rl.RlPrompt], task: str) -> list[sid_rl.RlPrompt]:
    return [p for p in prompts if p.task == task]


def port(seed: int, sample: int, sample_title_history: int) -> list[ref.RlSet]:
    """MiniOneRec's rl.py datasets, in its ConcatDataset order."""
    return [ref.sid_dataset(str(INDUSTRIAL_VALID), sample, seed),
            ref.rl_title2sid(str(INDUSTRIAL_ITEMS), str(INDUSTRIAL_INDEX), sample, seed),
            ref.rl_seq_title2sid(str(INDUSTRIAL_VALID), sample_title_history, seed)]


@pytest.mark.parametrize("seed, sample", [(0, -1), (42, 200)])
def test_prompts_and_targets_equal_minionerecs(seed, sample):
    ours = sid_rl.build_rl_prompts(config(sample_train=sample, sample_title_history=300), ALL, seed)
    theirs = [row for rows in port(seed, sample, 300) for row in rows.rows]
    assert [(p.prompt, p.target + "\n") for p in ours] == [(r["prompt"], r["completion"]) for r in theirs]
    sizes = {t: len(by_task(ours, t)) for t in sid_rl.RL_TASKS}
    n = 200 if sample > 0 else None
    # item_to_sid: MiniOneRec's title2sid (3646 distinct titles) then description2sid (2870 distinct descriptions)
    assert sizes == {"sid_next_item": n or 4532, "item_to_sid": n or 3646 + 2870, "title_history_sid": 300}
    assert [p.task for p in ours] == sorted((p.task for p in ours), key=sid_rl.RL_TASKS.index)
    assert {p.target for p in ours} <= sid.sid_strings(sid.load_index(str(INDUSTRIAL_INDEX)))


def test_first_prompts_are_minionerec_verbatim():
    prompts = sid_rl.build_rl_prompts(config(sample_title_history=-1), ALL, seed=0)
    first = {t: by_task(prompts, t)[0] for t in sid_rl.RL_TASKS}
    assert first["sid_next_item"] == sid_rl.RlPrompt(
        "sid_next_item", "### User Input: \nThe user has interacted with items <a_223><b_80><c_3> in chronological "
        "order. Can you predict the next possible item that the user may expect?\n\n### Response:\n",
        "<a_165><b_214><c_252>")
    assert first["item_to_sid"].prompt == (
        "### User Input: \nWhich item has the title: SUPCO SPP6 Relay/Capacitor Hard Start Kit with 500% Increase "
        "Starting Torque?\n\n### Response:\n")
    description = [p for p in by_task(prompts, "item_to_sid") if "described" in p.prompt][0]
    # item 0's description is a Python list written as a string: its first element
    assert description.prompt == (
        "### User Input: \nAn item can be described as follows: \"Relay/CAPACITOR hard start kit 500% incr starting "
        "torque,increased compressor starting torque. Designed for use on permanent split CAPACITOR single phase "
        "a/c and heat pump systems. Multiple use includes: room air conditioner units, residential or commercial "
        "psc AC units.. the country of origin is china.\". Which item is it describing?\n\n### Response:\n")
    assert description.target == first["item_to_sid"].target
    assert first["title_history_sid"] == sid_rl.RlPrompt(
        "title_history_sid", "### User Input: \nGiven the title sequence of user historical interactive items: "
        '"3D Solutech Real Black 3D Printer PLA Filament 1.75MM Filament, Dimensional Accuracy +/- 0.03 mm, 2.2 LBS '
        '(1.0KG) - PLA175RBLK", can you recommend a suitable next item for the user?\n\n### Response:\n',
        "<a_165><b_214><c_252>")
    # sample_title_history above the number of rows keeps every row in file order (pandas would raise)
    assert by_task(prompts, "title_history_sid") == by_task(
        sid_rl.build_rl_prompts(config(), only("title_history_sid"), seed=0), "title_history_sid")
    assert len(by_task(prompts, "title_history_sid")) == 4532


def test_minionerecs_reward_lookup_gives_some_prompts_another_rows_target():
    """MiniOneRec scores a completion against history2target[prompt2history[prompt]], dicts merged over its
    train datasets (last writer wins); we keep each row's own target. On the shared valid CSV 484 of 15580
    prompts would get another target there: same SID histories with other next items, and titles equal to a
    one-item title history (whose target is the user's next item, not the titled item)."""
    ours = sid_rl.build_rl_prompts(config(sample_title_history=-1), ALL, seed=0)
    sets = port(0, -1, -1)
    assert [(p.prompt, p.target + "\n") for p in ours] == [(r["prompt"], r["completion"]) for s in sets for r in s.rows]
    prompt2history, history2target = {}, {}
    for s in sets:
        prompt2history.update(s.prompt2history)
        history2target.update(s.history2target)
    other = [p.task for p in ours if history2target[prompt2history[p.prompt]] != p.target + "\n"]
    assert len(ours) == 15580 and len(other) == 484
    assert {t: other.count(t) for t in sid_rl.RL_TASKS} == {"sid_next_item": 91, "item_to_sid": 300,
                                                             "title_history_sid": 93}


def test_sampling_is_deterministic_and_per_task():
    cfg = config(sample_train=40, sample_title_history=30)
    a = sid_rl.build_rl_prompts(cfg, ALL, seed=3)
    assert {t: len(by_task(a, t)) for t in sid_rl.RL_TASKS} == {"sid_next_item": 40, "item_to_sid": 40,
                                                                 "title_history_sid": 30}
    assert a == sid_rl.build_rl_prompts(cfg, ALL, seed=3)
    b = sid_rl.build_rl_prompts(cfg, ALL, seed=4)
    for task in sid_rl.RL_TASKS:
        assert by_task(a, task) != by_task(b, task)
    # a task's prompts do not depend on which other tasks are on
    for task in sid_rl.RL_TASKS:
        assert sid_rl.build_rl_prompts(cfg, only(task), seed=3) == by_task(a, task)


def test_tasks_are_switchable_and_need_only_their_files(tmp_path):
    missing = str(tmp_path / "nope")
    assert {p.task for p in sid_rl.build_rl_prompts(config(item_meta_path=missing, sample_title_history=5),
                                                     only("sid_next_item", "title_history_sid"), 0)} \
        == {"sid_next_item", "title_history_sid"}
    assert {p.task for p in sid_rl.build_rl_prompts(config(train_file=missing), only("item_to_sid"), 0)} \
        == {"item_to_sid"}
    with pytest.raises(ConfigError, match="^tasks: expected at least one of sid_next_item, item_to_sid, "):
        sid_rl.RlTasksConfig(False, False, False).validate()


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in sid.sid_tokens(sid.load_index(str(INDUSTRIAL_INDEX)))])
    return tok


def test_tokenize_prompts_encodes_whole_prompts_and_keeps_the_tail(tokenizer):
    prompts = sid_rl.build_rl_prompts(config(sample_train=3, sample_title_history=3), ALL, seed=0)
    full = sid_rl.tokenize_prompts(prompts, tokenizer, max_len=4096)
    for p, ids in zip(prompts, full):
        assert ids.dtype == np.int32 and ids.tolist() == tokenizer.encode(p.prompt, add_special_tokens=False).ids
        assert tokenizer.decode(ids.tolist()) == p.prompt
    assert tokenizer.token_to_id(EOS_TOKEN) not in np.concatenate(full).tolist()
    cut = sid_rl.tokenize_prompts(prompts, tokenizer, max_len=24)
    for f, c in zip(full, cut):
        assert len(f) > 24 and len(c) == 24 and (c == f[-24:]).all()  # TRL: prompt_ids[:, -max_prompt_length:]
    assert sid_rl.tokenize_prompts([], tokenizer, 8) == []


@pytest.mark.parametrize("text, first", [
    ("['one', 'two']", "one"), ("['only']", "only"), ("plain text", "plain text"), ("['broken", "['broken"),
    ("['a' ']", "['a' ']"), ("", ""),
])
def test_description_cleanup(text, first):
    assert sid_rl._first_description(text) == first


# ---- bad inputs: one-line ConfigErrors that name the key ----

def _raises(cfg, start: str, tasks=ALL) -> str:
    with pytest.raises(ConfigError, match="^" + re.escape(start)) as e:
        sid_rl.build_rl_prompts(cfg, tasks, seed=0)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_files_name_their_key(tmp_path):
    for key in ("train_file", "sid_index_path", "item_meta_path"):
        assert str(tmp_path / key) in _raises(config(**{key: str(tmp_path / key)}), f"data.{key}: file not found")


def _csv(tmp_path, header: str, row: str) -> str:
    path = tmp_path / "t.csv"
    path.write_text(f"{header}\n{row}\n")
    return str(path)


def test_missing_column_and_bad_cells(tmp_path):
    no_titles = _csv(tmp_path, "history_item_sid,item_sid", '"[\'<a_223><b_80><c_3>\']",<a_165><b_214><c_252>')
    assert sid_rl.build_rl_prompts(config(train_file=no_titles), only("sid_next_item"), 0)
    msg = _raises(config(train_file=no_titles), "data.train_file:", tasks=only("title_history_sid"))
    assert "has no column 'history_item_title'" in msg and "(columns: 'history_item_sid, item_sid')" in msg
    unknown = _csv(tmp_path, "history_item_title,item_sid", '"[\'A\']",<a_9><b_9><c_999>')
    _raises(config(train_file=unknown), "data.train_file row 1: SID '<a_9><b_9><c_999>' is not in data.sid_index_path",
            tasks=only("title_history_sid"))
    bad = _csv(tmp_path, "history_item_title,item_sid", "A,<a_165><b_214><c_252>")
    _raises(config(train_file=bad), "data.train_file row 1: column 'history_item_title' is not a Python list",
            tasks=only("title_history_sid"))


def test_item_without_description(tmp_path):
    items = tmp_path / "x.item.json"
    items.write_text(json.dumps({"0": {"title": "T"}}))
    _raises(config(item_meta_path=str(items)), "data.item_meta_path: ", tasks=only("item_to_sid"))
    assert "item '0' has no string 'description'" in _raises(config(item_meta_path=str(items)), "data.item_meta_path",
                                                              tasks=only("item_to_sid"))


@pytest.mark.parametrize("kw, key", [({"max_prompt_len": 0}, "data.max_prompt_len:"),
                                     ({"sample_train": 0}, "data.sample_train:"),
                                     ({"sample_title_history": -2}, "data.sample_title_history:"),
                                     ({"sample_test": 0}, "data.sample_test:")])
def test_validate(kw, key):
    config().validate()
    with pytest.raises(ConfigError, match=f"^{key}"):
        config(**kw).validate()
