"""MiniOneRec SID SFT data (mllm_jax.data.sid) on the shared Industrial_and_Scientific data."""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import minionerec_ref as ref
from conftest import SHARED_DATA
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from mllm_jax.config import ConfigError
from mllm_jax.data import sid
from mllm_jax.models.tiny import EOS_TOKEN, PAD_TOKEN, build_tokenizer

AMAZON = SHARED_DATA / "MiniOneRec" / "data" / "Amazon"
NAME = "Industrial_and_Scientific"
VALID = AMAZON / "valid" / f"{NAME}_5_2016-10-2018-11.csv"
TEST = AMAZON / "test" / f"{NAME}_5_2016-10-2018-11.csv"
INDEX = AMAZON / "index" / f"{NAME}.index.json"
ITEMS = AMAZON / "index" / f"{NAME}.item.json"

HEAD = ("Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n### Instruction:\n")
ALL = sid.TasksConfig()


def only(*names: str) -> sid.TasksConfig:
    return sid.TasksConfig(**{t: t in names for t in sid.TASKS})


ONLY_NEXT = only("sid_next_item")


def config(**kw) -> sid.SidDataConfig:
    paths = {"train_file": VALID, "eval_file": TEST, "sid_index_path": INDEX, "item_meta_path": ITEMS}
    return sid.SidDataConfig(**{**{k: str(v) for k, v in paths.items()}, "category": NAME, **kw})


def prompts_of(cfg: sid.SidDataConfig, seed: int) -> list[sid.TestPrompt]:
    return sid.build_test_prompts(cfg.test_file, cfg.sid_index_path, cfg.sample_test, seed)


def by_task(examples: list[sid.Example], task: str) -> list[sid.Example]:
    return [e for e in examples if e.task == task]


@pytest.fixture(scope="module")
def real_examples() -> list[sid.Example]:
    assert VALID.is_file() and INDEX.is_file() and ITEMS.is_file(), f"shared data missing under {AMAZON}"
    return sid.build_examples(config(), ALL, "train", seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tokens = sid.sid_tokens(sid.load_index(str(INDEX)))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tokens])
    return tok


def test_prompts_of_the_first_valid_row_are_minionerec_verbatim(real_examples):
    # valid row 1: history ['<a_223><b_80><c_3>'] -> item 114, SID '<a_165><b_214><c_252>',
    # title "Super Glue 15187 Super Glue, 12-Pack"
    nxt = by_task(real_examples, "sid_next_item")[0]
    assert nxt.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        "### Instruction:\nCan you predict the next possible item that the user may expect?\n\n"
        "### User Input: \nThe user has interacted with items <a_223><b_80><c_3> in chronological order. "
        "Can you predict the next possible item that the user may expect?\n\n### Response:\n")
    assert nxt.response == "<a_165><b_214><c_252>\n"

    fusion = by_task(real_examples, "fusion_seq_rec")[0]
    assert fusion.prompt == (
        HEAD + "Can you recommend the next item for the user based on their interaction history?\n\n"
        "### User Input: \nThe user has sequentially interacted with items <a_223><b_80><c_3>. "
        "Can you recommend the next item for him? Tell me the title of the item\n\n### Response:\n")
    assert fusion.response == "Super Glue 15187 Super Glue, 12-Pack\n"

    # a longer history is joined with ", " (valid row 2)
    assert "items <a_224><b_38><c_1>, <a_244><b_35><c_73>, <a_244><b_35><c_73>, <a_42><b_133><c_2> in " \
        in by_task(real_examples, "sid_next_item")[1].prompt

    aligned = {(e.prompt, e.response) for e in by_task(real_examples, "sid_item_alignment")}
    question = HEAD + "Answer the question about item identification.\n\n### User Input: \n{}\n\n### Response:\n"
    assert (question.format('What is the title of item "<a_165><b_214><c_252>"?'),
            "Super Glue 15187 Super Glue, 12-Pack\n") in aligned
    assert (question.format("Which item has the title: Super Glue 15187 Super Glue, 12-Pack?"),
            "<a_165><b_214><c_252>\n") in aligned

    # SFTData: its instruction (drawn with the seed) ends "\n \n"; "palyed" and "{category}s" verbatim
    title = by_task(real_examples, "title_next_item")[0]
    assert title.instruction.startswith(HEAD) and title.instruction.endswith("\n \n")
    assert title.instruction[len(HEAD):-3] in [t.format(category="industrial and scientific items")
                                               for t in sid.TITLE_NEXT_INSTRUCTIONS]
    assert title.query == (
        "### User Input: \nThe user has palyed the following industrial and scientific itemss before: "
        '"3D Solutech Real Black 3D Printer PLA Filament 1.75MM Filament, Dimensional Accuracy +/- 0.03 mm, '
        '2.2 LBS (1.0KG) - PLA175RBLK"\n\n### Response:\n')
    assert title.response == '"Super Glue 15187 Super Glue, 12-Pack"\n'
    assert '"Dap 08648 10.1 oz. 100% Silicone Kitchen and Bath Sealant, Clear",\t"Dap 08648' \
        in by_task(real_examples, "title_next_item")[1].query  # titles joined with ",\t"

    to_sid = by_task(real_examples, "title_history_sid")[0]
    assert to_sid.prompt == (
        HEAD + "Based on the user's historical interaction with item titles, predict the semantic ID of the next "
        "item they may expect.\n\n### User Input: \nThe user has interacted with the following industrial and "
        'scientific items items in chronological order: "3D Solutech Real Black 3D Printer PLA Filament 1.75MM '
        'Filament, Dimensional Accuracy +/- 0.03 mm, 2.2 LBS (1.0KG) - PLA175RBLK". Can you predict the next '
        "item the user may expect?\n\n### Response:\n")
    assert to_sid.response == "<a_165><b_214><c_252>\n"  # item 114's SID in the index


def test_task_sizes_with_all_rows(real_examples):
    # alignment: MiniOneRec's sid2title / title2sid dicts (15 SIDs and 40 titles are shared by several items)
    sizes = {t: len(by_task(real_examples, t)) for t in sid.TASKS}
    assert sizes == {"sid_next_item": 4532, "sid_item_alignment": 3670 + 3646, "fusion_seq_rec": 4532,
                     "title_next_item": 4532, "title_history_sid": 4532}
    assert [e.task for e in real_examples] == sorted((e.task for e in real_examples), key=sid.TASKS.index)
    evals = sid.build_examples(config(), ALL, "eval", seed=0)
    assert len(evals) == 4533 and {e.task for e in evals} == {"sid_next_item"}


def test_alignment_has_both_directions(real_examples):
    align = by_task(real_examples, "sid_item_alignment")
    to_title = [e for e in align if "What is the title of item" in e.prompt]
    to_sid = [e for e in align if "Which item has the title:" in e.prompt]
    assert len(to_title) == 3670 and len(to_sid) == 3646 and len(to_title) + len(to_sid) == len(align)
    assert all(re.fullmatch(r"(<[abc]_\d+>){3}\n", e.response) for e in to_sid)
    assert not any(re.search(r"<[abc]_\d+>", e.response) for e in to_title[:100])


def test_sample_draws_n_per_task_deterministically():
    cfg = config(sample_train=50, sample_eval=20)
    a = sid.build_examples(cfg, ALL, "train", seed=1)
    assert {t: len(by_task(a, t)) for t in sid.TASKS} == dict.fromkeys(sid.TASKS, 50)
    assert a == sid.build_examples(cfg, ALL, "train", seed=1)
    b = sid.build_examples(cfg, ALL, "train", seed=2)
    for task in sid.TASKS:
        assert by_task(a, task) != by_task(b, task)
    # like MiniOneRec (df.sample with the same seed), next-item and fusion read the same rows
    history = lambda e: e.prompt.split("items ", 1)[1].split(" in chronological")[0].split(". Can you")[0]
    assert [history(e) for e in by_task(a, "sid_next_item")] == [history(e) for e in by_task(a, "fusion_seq_rec")]
    # ... and so do the title tasks (the next item's SID from item_id is the row's item_sid)
    assert [e.response for e in by_task(a, "title_history_sid")] == [e.response for e in by_task(a, "sid_next_item")]
    assert [e.query.split("before: ")[1] for e in by_task(a, "title_next_item")] == \
        [e.query.split("order: ")[1].split(". Can you")[0].replace('", "', '",\t"') + "\n\n### Response:\n"
         for e in by_task(a, "title_history_sid")]
    ev = sid.build_examples(cfg, ALL, "eval", seed=1)
    assert len(ev) == 20 and ev == sid.build_examples(cfg, ALL, "eval", seed=1)
    # a sample as large as the data keeps it all
    assert len(sid.build_examples(config(sample_train=10**6), ONLY_NEXT, "train", seed=0)) == 4532


def test_sample_matches_pandas_like_minionerec():
    pd = pytest.importorskip("pandas")
    rows = pd.read_csv(VALID).sample(30, random_state=7)
    got = sid.build_examples(config(sample_train=30), ONLY_NEXT, "train", seed=7)
    assert [e.response for e in got] == [s + "\n" for s in rows["item_sid"]]


def test_tasks_are_switchable_and_need_only_their_files(tmp_path):
    missing = str(tmp_path / "nope.json")
    only_next = sid.build_examples(config(item_meta_path=missing), ONLY_NEXT, "train", seed=0)
    assert {e.task for e in only_next} == {"sid_next_item"}
    only_align = sid.build_examples(config(train_file=missing), only("sid_item_alignment"), "train", seed=0)
    assert {e.task for e in only_align} == {"sid_item_alignment"}
    # the title tasks read the CSV and (title_history_sid) the index, not the item metadata
    titles = sid.build_examples(config(item_meta_path=missing, sample_train=5),
                                only("title_next_item", "title_history_sid"), "train", seed=0)
    assert [e.task for e in titles] == ["title_next_item"] * 5 + ["title_history_sid"] * 5
    # eval reads eval_file (next-item only), not train_file or the item metadata
    assert sid.build_examples(config(train_file=missing, item_meta_path=missing, sample_eval=5), ALL, "eval", 0)
    with pytest.raises(ConfigError, match="tasks: expected at least one"):
        sid.TasksConfig(False, False, False, False, False).validate()


def test_loss_mask_covers_exactly_response_and_eos(real_examples, tokenizer):
    eos = tokenizer.token_to_id(EOS_TOKEN)
    picked = [by_task(real_examples, t)[i] for t in sid.TASKS for i in (0, 1, 7)]
    data = sid.tokenize(picked, tokenizer, eos, max_len=2048)  # long title histories: no truncation
    assert len(data) == len(picked) and data.tasks == [e.task for e in picked]
    for ex, ids, mask in zip(picked, data.ids, data.loss_mask):
        assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
        n_resp = len(tokenizer.encode(ex.response, add_special_tokens=False).ids)
        assert mask.sum() == n_resp + 1 and mask[-n_resp - 1:].all() and not mask[:-n_resp - 1].any()
        assert ids[-1] == eos and eos not in ids[:-1].tolist()
        assert tokenizer.decode(ids[mask][:-1].tolist()) == ex.response
        assert tokenizer.decode(ids[~mask].tolist()) == ex.prompt
    # a SID is three tokens
    sid_only = sid.tokenize([sid.Example("x", "p", "q", "<a_165><b_214><c_252>\n")], tokenizer, eos, 64)
    assert sid_only.loss_mask[0].sum() == 3 + 1 + 1
    assert data.max_length() == max(len(x) for x in data.ids)


def test_left_truncation_keeps_the_tail(real_examples, tokenizer):
    eos = tokenizer.token_to_id(EOS_TOKEN)
    ex = by_task(real_examples, "fusion_seq_rec")[:4]
    full = sid.tokenize(ex, tokenizer, eos, max_len=512)
    cut = sid.tokenize(ex, tokenizer, eos, max_len=80)
    for f_ids, f_mask, c_ids, c_mask in zip(full.ids, full.loss_mask, cut.ids, cut.loss_mask):
        assert len(f_ids) > 80 and len(c_ids) == 80
        assert (c_ids == f_ids[-80:]).all() and (c_mask == f_mask[-80:]).all() and c_mask.sum() == f_mask.sum()
        assert not c_mask[0]  # at least one prompt token left


def test_max_len_too_small_for_an_example(tokenizer):
    eos = tokenizer.token_to_id(EOS_TOKEN)
    ex = sid.Example("fusion_seq_rec", "pro", "mpt", "A long title of an item of many words\n")
    need = len(tokenizer.encode(ex.response, add_special_tokens=False).ids) + 2
    assert len(sid.tokenize([ex], tokenizer, eos, need).ids[0]) == need
    with pytest.raises(ConfigError) as e:
        sid.tokenize([ex], tokenizer, eos, need - 1)
    msg = str(e.value)
    assert msg.startswith("data.max_len:") and "fusion_seq_rec" in msg and str(need) in msg and "\n" not in msg


def test_sid_tokens_of_real_index_cover_every_csv_row():
    index = sid.load_index(str(INDEX))
    tokens = sid.sid_tokens(index)
    assert tokens == sorted(set(tokens)) and len(index) == 3686
    assert all(re.fullmatch(r"<[abc]_\d+>", t) for t in tokens)
    known = set(tokens)
    for path in (VALID, TEST):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                assert set(re.findall(r"<[^<>]+>", row["history_item_sid"] + row["item_sid"])) <= known


def test_batch_pads_right_and_fills_rows():
    data = sid.TokenizedExamples(
        ids=[np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)],
        loss_mask=[np.array([False, True, True]), np.array([False, True])], tasks=["a", "b"])
    b = data.batch(np.array([1, -1, 0]), length=4, pad_id=0)
    assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == bool
    assert b["input_ids"].tolist() == [[8, 9, 0, 0], [0, 0, 0, 0], [5, 6, 7, 0]]
    assert b["loss_mask"].tolist() == [[False, True, False, False], [False] * 4, [False, True, True, False]]
    assert data.max_length() == 3 and len(data) == 2
    with pytest.raises(ValueError):
        data.batch(np.array([0]), length=2, pad_id=0)


def test_title_next_item_draws_one_of_eleven_instructions_per_row(real_examples):
    drawn = [e.instruction[len(HEAD):-3] for e in by_task(real_examples, "title_next_item")]
    pool = [t.format(category="industrial and scientific items") for t in sid.TITLE_NEXT_INSTRUCTIONS]
    assert len(pool) == 11 and set(drawn) == set(pool)
    rng = random.Random(0)  # MiniOneRec: random.seed(seed), then random.randint(0, 10) row by row
    assert drawn == [pool[rng.randint(0, 10)] for _ in drawn]


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer):
    """The tiny tokenizer as MiniOneRec sees a Qwen2.5 tokenizer: transformers' fast tokenizer, no BOS."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    assert hf.bos_token is None and hf.eos_token_id == tokenizer.token_to_id(EOS_TOKEN)
    return hf


@pytest.mark.parametrize("seed, max_len", [(42, 512), (7, 160)])
def test_token_ids_equal_minionerecs(tokenizer, hf_tokenizer, seed, max_len):
    """The five tasks' ids and loss masks are those of MiniOneRec's datasets (tests/minionerec_ref.py) on
    200 sampled rows / pairs per task."""
    n, enc, category = 200, ref.Encoder(hf_tokenizer), ref.CATEGORY_DICT[NAME]
    theirs = {"sid_next_item": ref.sid_sft(str(VALID), enc, max_len, n, seed),
              "sid_item_alignment": ref.sid_item_feat(str(ITEMS), str(INDEX), enc, max_len, n, seed),
              "fusion_seq_rec": ref.fusion_seq_rec(str(VALID), str(ITEMS), str(INDEX), enc, max_len, n, seed),
              "title_next_item": ref.sft_data(str(VALID), enc, max_len, n, seed, category),
              "title_history_sid": ref.title_history2sid(str(VALID), str(INDEX), enc, max_len, n, seed, category)}
    ours = sid.build_examples(config(sample_train=n), ALL, "train", seed)
    data = sid.tokenize(ours, tokenizer, tokenizer.token_to_id(EOS_TOKEN), max_len)
    assert data.tasks == [t for t in sid.TASKS for _ in range(n)] == [t for t in sid.TASKS for _ in theirs[t]]
    refs = [row for t in sid.TASKS for row in theirs[t]]
    truncated = 0
    for example, ids, mask, row in zip(ours, data.ids, data.loss_mask, refs):
        assert ids.tolist() == row["input_ids"], example.task
        assert mask.tolist() == [label != -100 for label in row["labels"]], example.task
        assert example.prompt == row["prompt"]
        if len(ids) < max_len:
            assert tokenizer.decode(ids[~mask].tolist()) == hf_tokenizer.decode(row["input_ids"][:(~mask).sum()]) \
                == example.prompt
        truncated += len(ids) == max_len
    assert truncated > 0  # the tiny tokenizer's long title histories: left truncation compared too


def test_prompt_pieces_are_encoded_apart_like_minionerec():
    """A BPE that learned "\\n\\n" merges the end of an instruction block encoded on its own, not inside the
    whole prompt (its pre-tokenizer splits "\\n\\n###" apart), so encoding the concatenation would differ."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a\n\n"] * 50, trainer)
    ex = sid._example("sid_next_item", "Do it?", "x", "y\n")
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids
    apart = encode(ex.instruction) + encode(ex.query)
    assert apart != encode(ex.prompt)
    assert sid.tokenize([ex], tok, 0, 512).ids[0].tolist() == apart + encode("y\n") + [0]
    test = sid.TestPrompt(ex.instruction, ex.query, "<a_1>")
    assert sid.tokenize_prompts([test], tok, 512)[0].tolist() == apart


# ---- bad inputs: one-line ConfigErrors that name the key ----

def _raises(cfg, key_text: str, tasks=ALL, split="train") -> str:
    with pytest.raises(ConfigError) as e:
        sid.build_examples(cfg, tasks, split, seed=0)
    msg = str(e.value)
    assert msg.startswith(key_text) and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("key", ["train_file", "sid_index_path", "item_meta_path"])
def test_missing_file(tmp_path, key):
    path = str(tmp_path / "missing")
    assert path in _raises(config(**{key: path}), f"data.{key}: file not found")


def test_missing_eval_file(tmp_path):
    _raises(config(eval_file=str(tmp_path / "x.csv")), "data.eval_file: file not found", split="eval")
    _raises(config(eval_file=""), "data.eval_file:", split="eval")


def _write_csv(path: Path, rows: list[list[str]], header=("user_id", "history_item_sid", "item_sid")) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def small_index(tmp_path) -> str:
    path = tmp_path / "x.index.json"
    path.write_text(json.dumps({"0": ["<a_1>", "<b_2>", "<c_3>"], "1": ["<a_4>", "<b_5>", "<c_6>"]}))
    return str(path)


def test_csv_missing_column(tmp_path, small_index):
    bad = _write_csv(tmp_path / "t.csv", [["u", "['<a_1><b_2><c_3>']"]], header=("user_id", "history_item_sid"))
    msg = _raises(config(train_file=bad, sid_index_path=small_index), "data.train_file:", tasks=ONLY_NEXT)
    assert "has no column 'item_sid'" in msg and "user_id, history_item_sid" in msg


def test_sid_not_in_index(tmp_path, small_index):
    good = _write_csv(tmp_path / "ok.csv", [["u", "['<a_1><b_2><c_3>']", "<a_4><b_5><c_6>"]])
    assert len(sid.build_examples(config(train_file=good, sid_index_path=small_index), ONLY_NEXT, "train", 0)) == 1
    rows = [["u", "['<a_1><b_2><c_3>']", "<a_4><b_5><c_6>"],
            ["v", "['<a_1><b_2><c_3>', '<a_9><b_9><c_9>']", "<a_1><b_2><c_3>"]]
    msg = _raises(config(train_file=_write_csv(tmp_path / "h.csv", rows), sid_index_path=small_index),
                  "data.train_file row 2: SID '<a_9><b_9><c_9>' is not in data.sid_index_path", tasks=ONLY_NEXT)
    assert small_index in msg
    rows = [["u", "['<a_1><b_2><c_3>']", "<a_7><b_7><c_7>"]]
    _raises(config(eval_file=_write_csv(tmp_path / "t.csv", rows), sid_index_path=small_index),
            "data.eval_file row 1: SID '<a_7><b_7><c_7>'", split="eval")


@pytest.mark.parametrize("cell", ["<a_1><b_2><c_3>", "['<a_1><b_2><c_3>'", "[1, 2]", "__import__('os')"])
def test_malformed_list_cell(tmp_path, small_index, cell):
    rows = [["u", "['<a_1><b_2><c_3>']", "<a_4><b_5><c_6>"], ["v", cell, "<a_4><b_5><c_6>"]]
    bad = _write_csv(tmp_path / "t.csv", rows)
    msg = _raises(config(train_file=bad, sid_index_path=small_index), "data.train_file row 2:", tasks=ONLY_NEXT)
    assert "history_item_sid" in msg


def test_category_is_needed_by_the_title_tasks_only():
    choices = "Industrial_and_Scientific, Office_Products, Toys_and_Games, Sports, Books"
    msg = _raises(config(category=None), f"data.category: expected one of {choices} (the tasks title_next_item, "
                  "title_history_sid name it), got None")
    _raises(config(category=None), "data.category:", tasks=only("title_history_sid"))
    sid_tasks = only("sid_next_item", "sid_item_alignment", "fusion_seq_rec")
    assert sid.build_examples(config(category=None, sample_train=3), sid_tasks, "train", seed=0)
    assert sid.build_examples(config(category=None, sample_eval=3), ALL, "eval", seed=0)  # eval: next-item only
    with pytest.raises(ConfigError) as e:
        config(category="Toys").validate()
    assert str(e.value) == f"data.category: expected one of {choices}, got 'Toys'" and "\n" not in msg
    for key, phrase in sid.CATEGORIES.items():
        config(category=key).validate()
        ex = sid.build_examples(config(category=key, sample_train=1), only("title_next_item", "title_history_sid"),
                                "train", seed=0)
        assert f"the following {phrase}s before:" in ex[0].query and f"following {phrase} items in" in ex[1].query


TITLE_HEADER = ("user_id", "history_item_title", "item_title", "item_id", "history_item_sid", "item_sid")
GOOD_ROW = ["u", "['A', 'B']", "C", "1", "['<a_1><b_2><c_3>']", "<a_4><b_5><c_6>"]


def test_title_columns_are_read_when_a_task_needs_them(tmp_path, small_index):
    sid_only = _write_csv(tmp_path / "s.csv", [["u", "['<a_1><b_2><c_3>']", "<a_4><b_5><c_6>"]])
    assert sid.build_examples(config(train_file=sid_only, sid_index_path=small_index), ONLY_NEXT, "train", 0)
    for task in ("title_next_item", "title_history_sid"):
        msg = _raises(config(train_file=sid_only, sid_index_path=small_index), "data.train_file:", tasks=only(task))
        assert "has no column 'history_item_title'" in msg
    titles_only = _write_csv(tmp_path / "t.csv", [["u", "['A']", "1"]],
                             header=("user_id", "history_item_title", "item_id"))
    cfg = config(train_file=titles_only, sid_index_path=small_index)
    assert "has no column 'item_title'" in _raises(cfg, "data.train_file:", tasks=only("title_next_item"))
    [ex] = sid.build_examples(cfg, only("title_history_sid"), "train", 0)
    assert ex.response == "<a_4><b_5><c_6>\n" and '"A". Can you' in ex.query
    full = _write_csv(tmp_path / "f.csv", [GOOD_ROW], header=TITLE_HEADER)
    ex = sid.build_examples(config(train_file=full, sid_index_path=small_index), only("title_next_item"), "train", 0)
    assert ex[0].response == '"C"\n' and 'before: "A",\t"B"\n' in ex[0].query


@pytest.mark.parametrize("row, task, message", [
    (["v", "A, B", "C", "1"], "title_next_item",
     "data.train_file row 2: column 'history_item_title' is not a Python list of strings: 'A, B'"),
    (["v", "['A', 2]", "C", "1"], "title_history_sid", "data.train_file row 2: column 'history_item_title' is not"),
    (["v", "['A']", "", "1"], "title_next_item", "data.train_file row 2: column 'item_title' is empty"),
    (["v", "['A']", "C", " "], "title_history_sid", "data.train_file row 2: column 'item_id' is empty"),
    (["v", "['A']", "C", "7"], "title_history_sid", "data.train_file row 2: item_id '7' is not in data.sid_index_path"),
])
def test_bad_title_cells(tmp_path, small_index, row, task, message):
    bad = _write_csv(tmp_path / "t.csv", [GOOD_ROW, row + GOOD_ROW[4:]], header=TITLE_HEADER)
    msg = _raises(config(train_file=bad, sid_index_path=small_index), message, tasks=only(task))
    assert msg.endswith(f"({bad})") or msg.endswith(f"({small_index})")


def test_bad_index_file(tmp_path):
    path = tmp_path / "bad.index.json"
    path.write_text('{"0": "<a_1>"}')
    _raises(config(sid_index_path=str(path)), "data.sid_index_path:", tasks=ONLY_NEXT)
    path.write_text("not json")
    _raises(config(sid_index_path=str(path)), "data.sid_index_path:", tasks=ONLY_NEXT)


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown split"):
        sid.build_examples(config(), ALL, "test", seed=0)


@pytest.mark.parametrize("kw, key", [({"max_len": 4}, "data.max_len:"), ({"sample_train": 0}, "data.sample_train:"),
                                     ({"sample_eval": -2}, "data.sample_eval:")])
def test_validate(kw, key):
    config().validate()
    with pytest.raises(ConfigError, match=f"^{key}"):
        config(**kw).validate()



# ---- the SID evaluation's test prompts (build_test_prompts) ----

def with_test_file(**kw) -> sid.SidDataConfig:
    return config(test_file=str(TEST), **kw)


def test_test_prompt_of_the_first_test_row_is_minionerec_verbatim():
    prompts = prompts_of(with_test_file(), seed=0)
    assert len(prompts) == 4533  # every row, in file order
    first = prompts[0]
    assert first.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request. \n\n"
        "### Instruction:\nCan you predict the next possible item that the user may expect?\n\n"
        "### User Input: \nCan you predict the next possible item the user may expect, given the following "
        "chronological interaction history: <a_223><b_80><c_165>, <a_223><b_80><c_159>, <a_223><b_80><c_0>, "
        "<a_223><b_80><c_158>, <a_223><b_198><c_173>, <a_223><b_198><c_100>, <a_223><b_80><c_91>, "
        "<a_223><b_80><c_25>, <a_223><b_86><c_176>, <a_223><b_72><c_93>\n\n### Response:\n")
    assert first.target == "<a_223><b_80><c_216>"
    assert prompts[1].prompt.endswith("interaction history: <a_202><b_147><c_0>\n\n### Response:\n")
    assert prompts[1].target == "<a_202><b_118><c_74>"
    # the eval file (same CSV here) and the test prompts share the history and target
    assert sid.build_examples(with_test_file(), ALL, "eval", 0)[0].response == first.target + "\n"


def test_test_prompts_sampling():
    a = prompts_of(with_test_file(sample_test=25), seed=3)
    assert len(a) == 25 and a == prompts_of(with_test_file(sample_test=25), seed=3)
    assert a != prompts_of(with_test_file(sample_test=25), seed=4)
    every = prompts_of(with_test_file(), seed=3)
    assert set(a) <= set(every) and len(set(a)) == 25
    # sample_test reads the rows eval would draw with the same n and seed (MiniOneRec's df.sample)
    ev = sid.build_examples(with_test_file(sample_eval=25), ALL, "eval", seed=3)
    assert [p.target + "\n" for p in a] == [e.response for e in ev]
    assert len(prompts_of(with_test_file(sample_test=10**6), seed=0)) == 4533


def test_test_prompts_sample_matches_pandas_like_minionerec():
    pd = pytest.importorskip("pandas")
    rows = pd.read_csv(TEST).sample(30, random_state=11)
    got = prompts_of(with_test_file(sample_test=30), seed=11)
    assert [p.target for p in got] == list(rows["item_sid"])


def _test_raises(cfg, key_text: str) -> str:
    with pytest.raises(ConfigError) as e:
        prompts_of(cfg, seed=0)
    msg = str(e.value)
    assert msg.startswith(key_text) and "\n" not in msg, msg
    return msg


def test_test_file_errors_name_the_key(tmp_path, small_index):
    missing = str(tmp_path / "missing.csv")
    assert missing in _test_raises(config(test_file=missing), "data.test_file: file not found")
    _test_raises(config(), "data.test_file: expected a file path")
    bad = _write_csv(tmp_path / "t.csv", [["u", "['<a_1><b_2><c_3>']"]], header=("user_id", "history_item_sid"))
    msg = _test_raises(config(test_file=bad, sid_index_path=small_index), "data.test_file:")
    assert "has no column 'item_sid'" in msg
    rows = [["u", "['<a_1><b_2><c_3>']", "<a_4><b_5><c_6>"], ["v", "['<a_1><b_2><c_3>']", "<a_7><b_7><c_7>"]]
    _test_raises(config(test_file=_write_csv(tmp_path / "s.csv", rows), sid_index_path=small_index),
                 "data.test_file row 2: SID '<a_7><b_7><c_7>' is not in data.sid_index_path")
    _test_raises(with_test_file(sid_index_path=str(tmp_path / "nope.json")), "data.sid_index_path: file not found")
    with pytest.raises(ConfigError, match="^data.sample_test:"):
        with_test_file(sample_test=0).validate()
    with_test_file(sample_test=5).validate()


def test_tokenize_prompts_left_truncates_without_special_tokens(tokenizer):
    prompts = prompts_of(with_test_file(sample_test=4), seed=0)
    full = sid.tokenize_prompts(prompts, tokenizer, max_len=4096)
    assert [tokenizer.decode(ids.tolist()) for ids in full] == [p.prompt for p in prompts]
    assert all(ids.dtype == np.int32 for ids in full)
    assert tokenizer.token_to_id(EOS_TOKEN) not in np.concatenate(full).tolist()
    cut = sid.tokenize_prompts(prompts, tokenizer, max_len=40)
    for f, c in zip(full, cut):
        assert len(f) > 40 and len(c) == 40 and (c == f[-40:]).all()
    assert sid.tokenize_prompts([], tokenizer, 8) == []


def test_shared_sids_are_noted_and_special_tokens_refused():
    """The real Industrial index has SIDs that two items share (RQ-VAE codes collide): accepted, as
    upstream, with a note that names them. A SID token that is one of the tokenizer's special
    tokens (whatever its form) is refused: adding it would not make a new ordinary token."""
    note = sid.collisions(sid.load_index(str(INDEX)))
    assert note is not None and note.startswith("note: data.sid_index_path: 15 of 3670 SIDs are shared by several")
    assert sid.collisions({"1": ["<a_1>", "<b_1>"], "2": ["<a_1>", "<b_2>"]}) is None
    from mllm_jax.models import hf

    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens([AddedToken("<sep>", special=True)])
    with pytest.raises(ConfigError, match=r"SID token '<sep>' is a special token of the model's tokenizer"):
        hf.add_tokens(tokenizer, ["<a_1>", "<sep>"])
    assert hf.add_tokens(tokenizer, ["<a_1>", "<b_2>", "<a_1>"]) == 2
