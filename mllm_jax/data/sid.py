"""MiniOneRec semantic-ID (SID) supervised fine-tuning data: pure Python + numpy.

Three tasks, each switchable, built as in MiniOneRec's `sft.py` (`data.py`: SidSFTDataset,
SidItemFeatDataset, FusionSeqRecDataset):

- `sid_next_item`: the SIDs of a user's history -> the SID of the next item (reads the CSV);
- `sid_item_alignment`: the title of a SID and the SID of a title, over every item of the
  index that has metadata (reads the index and item JSON files, not the CSV);
- `fusion_seq_rec`: the SIDs of a user's history -> the title of the next item (CSV + both JSONs).

Every example is MiniOneRec's Alpaca-style prompt (`TEMPLATE`) followed by the response
(`output + "\\n"`) and EOS; the loss covers only the response and EOS. Sampling matches MiniOneRec
for a given seed: CSV tasks draw the rows `pandas.DataFrame.sample(n, random_state=seed)` would
draw, and alignment draws `random.Random(seed).sample(examples, n)`.

The SID evaluation (constrained beam search) reads `test_file` through `build_test_prompts`:
MiniOneRec's EvalSidDataset prompts (`EVAL_INSTRUCTION`, `EVAL_INPUT`), each with its target SID.
"""

from __future__ import annotations

import ast
import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from mllm_jax.config import ConfigError

TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n### User Input: \n{input}\n\n### Response:\n"
)

TASKS = ("sid_next_item", "sid_item_alignment", "fusion_seq_rec")

NEXT_ITEM_INSTRUCTION = "Can you predict the next possible item that the user may expect?"
NEXT_ITEM_INPUT = (
    "The user has interacted with items {history} in chronological order. "
    "Can you predict the next possible item that the user may expect?"
)
ALIGNMENT_INSTRUCTION = "Answer the question about item identification."
SID_TO_TITLE_INPUT = 'What is the title of item "{sid}"?'
TITLE_TO_SID_INPUT = "Which item has the title: {title}?"
FUSION_INSTRUCTION = "Can you recommend the next item for the user based on their interaction history?"
FUSION_INPUT = (
    "The user has sequentially interacted with items {history}. "
    "Can you recommend the next item for him? Tell me the title of the item"
)

EVAL_INSTRUCTION = "Can you predict the next possible item that the user may expect?"
EVAL_INPUT = ("Can you predict the next possible item the user may expect, "
              "given the following chronological interaction history: {history}")

HISTORY_COLUMN, TARGET_COLUMN = "history_item_sid", "item_sid"


@dataclass
class SidDataConfig:
    """The `data:` section of the sft recipe: MiniOneRec's files, read by path."""

    train_file: str | None = None
    """MiniOneRec CSV for training (`.../train/*.csv` upstream); the next-item and fusion tasks read it.
    Needs the columns `history_item_sid` (a Python-literal list of SIDs) and `item_sid`."""
    eval_file: str | None = None
    """CSV for the held-out eval loss (next-item task only, like MiniOneRec's validation set)."""
    sid_index_path: str | None = None
    """`*.index.json`: item id -> SID tokens, e.g. ["<a_1>", "<b_2>", "<c_3>"]. Always needed: every SID
    of the CSVs must be in it, and its tokens are the ones added to the tokenizer."""
    item_meta_path: str | None = None
    """`*.item.json`: item id -> {title, ...}; needed by the alignment and fusion tasks (titles)."""
    max_len: int = 512
    """Tokens per example (MiniOneRec's cutoff_len); longer examples lose the start of their prompt."""
    sample_train: int = -1
    """Examples per training task drawn with the seed (CSV rows, or alignment pairs); -1 = all."""
    sample_eval: int = -1
    """Rows of eval_file drawn with the seed; -1 = all."""
    test_file: str | None = None
    """CSV whose next items the SID evaluation predicts (constrained beam search); MiniOneRec's
    `.../test/*.csv`, same columns as train_file."""
    sample_test: int = -1
    """Rows of test_file drawn with the seed; -1 = all."""

    def validate(self) -> None:
        if not isinstance(self.max_len, int) or self.max_len < 8:
            raise ConfigError(f"data.max_len: expected an integer >= 8, got {self.max_len!r}")
        for key in ("sample_train", "sample_eval", "sample_test"):
            value = getattr(self, key)
            if not isinstance(value, int) or value == 0 or value < -1:
                raise ConfigError(f"data.{key}: expected -1 (all) or a positive integer, got {value!r}")


@dataclass
class TasksConfig:
    """The `tasks:` section of the sft recipe: which MiniOneRec SFT tasks make up the training data."""

    sid_next_item: bool = True
    """History SIDs -> next item's SID (SidSFTDataset)."""
    sid_item_alignment: bool = True
    """SID -> title and title -> SID for every indexed item (SidItemFeatDataset)."""
    fusion_seq_rec: bool = True
    """History SIDs -> next item's title (FusionSeqRecDataset)."""

    def enabled(self) -> list[str]:
        return [name for name in TASKS if getattr(self, name)]

    def validate(self) -> None:
        if not self.enabled():
            raise ConfigError(f"tasks: expected at least one of {', '.join(TASKS)} to be true")


@dataclass(frozen=True)
class Example:
    task: str
    """One of TASKS."""
    prompt: str
    """TEMPLATE filled in: everything before the response."""
    response: str
    """The target text, `output + "\\n"` (EOS is appended at tokenization)."""


def _prompt(instruction: str, input_: str) -> str:
    return TEMPLATE.format(instruction=instruction, input=input_)


def _require_file(key: str, path: str | None) -> Path:
    if not path:
        raise ConfigError(f"data.{key}: expected a file path, got {path!r}")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.{key}: file not found: {path}")
    return p


def _read_json(key: str, path: str) -> object:
    p = _require_file(key, path)
    try:
        with p.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.{key}: {path} is not valid JSON ({e})") from None


def load_index(path: str) -> dict[str, list[str]]:
    """`*.index.json` (the `data.sid_index_path` file): item id -> SID tokens."""
    raw = _read_json("sid_index_path", path)
    if not isinstance(raw, dict):
        raise ConfigError(f"data.sid_index_path: {path}: expected a JSON object of item id -> list of SID tokens")
    for item_id, tokens in raw.items():
        if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and t for t in tokens)):
            raise ConfigError(
                f"data.sid_index_path: {path}: item {item_id!r}: expected a non-empty list of SID tokens, "
                f"got {_short(tokens)}")
    return raw


def sid_tokens(index: dict[str, list[str]]) -> list[str]:
    """The distinct SID tokens of an index, sorted: the tokens to add to the tokenizer
    (MiniOneRec's TokenExtender.get_new_tokens)."""
    return sorted({token for tokens in index.values() for token in tokens})


def _load_titles(path: str) -> dict[str, str]:
    raw = _read_json("item_meta_path", path)
    if not isinstance(raw, dict):
        raise ConfigError(f"data.item_meta_path: {path}: expected a JSON object of item id -> {{title, ...}}")
    titles = {}
    for item_id, meta in raw.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("title"), str):
            raise ConfigError(f"data.item_meta_path: {path}: item {item_id!r} has no string 'title'")
        titles[item_id] = meta["title"]
    return titles


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class _Row:
    history: list[str]
    target: str


def _read_rows(key: str, path: str, sids: set[str], index_path: str) -> list[_Row]:
    """The (history SIDs, target SID) of every row of a MiniOneRec CSV, each SID checked against the index."""
    p = _require_file(key, path)
    try:
        with p.open(encoding="utf-8-sig", newline="") as f:
            return _parse_rows(csv.reader(f), key, path, sids, index_path)
    except (UnicodeDecodeError, csv.Error) as e:  # a binary file
        why = f"byte {e.start} is not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e)
        raise ConfigError(f"data.{key}: {path} is not a UTF-8 CSV file ({why})") from None


def _parse_rows(reader: Iterator[list[str]], key: str, path: str, sids: set[str], index_path: str) -> list[_Row]:
    """_read_rows's checks, row by row, over an open CSV reader."""
    rows: list[_Row] = []
    header = next(reader, None)
    if not header:
        raise ConfigError(f"data.{key}: {path} is empty (expected a header with {HISTORY_COLUMN}, {TARGET_COLUMN})")
    columns = [c.strip() for c in header]
    for name in (HISTORY_COLUMN, TARGET_COLUMN):
        if name not in columns:
            raise ConfigError(f"data.{key}: {path} has no column {name!r} (columns: {_short(', '.join(columns))})")
    h_col, t_col = columns.index(HISTORY_COLUMN), columns.index(TARGET_COLUMN)
    need = max(h_col, t_col) + 1
    for n, record in enumerate(reader, start=1):
        where = f"data.{key} row {n}"
        if not record:
            continue  # a blank line
        if len(record) < need:
            raise ConfigError(f"{where}: expected {len(columns)} fields, got {len(record)} ({path})")
        cell = record[h_col]
        try:
            history = ast.literal_eval(cell)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            history = None
        if not (isinstance(history, list) and all(isinstance(s, str) for s in history)):
            raise ConfigError(f"{where}: column {HISTORY_COLUMN!r} is not a Python list of SID strings: "
                              f"{_short(cell)} ({path})")
        target = record[t_col].strip()
        if not target:
            raise ConfigError(f"{where}: column {TARGET_COLUMN!r} is empty ({path})")
        for sid in (*history, target):
            if sid not in sids:
                raise ConfigError(f"{where}: SID {sid!r} is not in data.sid_index_path ({index_path})")
        rows.append(_Row(history, target))
    return rows


def _sample_rows(rows: list, n: int, seed: int) -> list:
    """`n` rows as `pandas.DataFrame.sample(n, random_state=seed)` draws them (MiniOneRec's CSV datasets);
    n == -1, or n >= the number of rows, keeps every row in file order."""
    if n < 0 or n >= len(rows):
        return list(rows)
    picks = np.random.RandomState(seed % 2**32).choice(len(rows), size=n, replace=False)
    return [rows[i] for i in picks]


def _next_item(row: _Row) -> Example:
    history = ", ".join(row.history)
    return Example("sid_next_item", _prompt(NEXT_ITEM_INSTRUCTION, NEXT_ITEM_INPUT.format(history=history)),
                   row.target + "\n")


def _fusion(row: _Row, sid2title: dict[str, str]) -> Example:
    history = ", ".join(row.history)
    return Example("fusion_seq_rec", _prompt(FUSION_INSTRUCTION, FUSION_INPUT.format(history=history)),
                   sid2title[row.target] + "\n")


def _sid_maps(index: dict[str, list[str]], titles: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """MiniOneRec's sid2title and title2sid: over index items that have a title, in index order, a later
    item overwriting an earlier one with the same SID (or title)."""
    sid2title, title2sid = {}, {}
    for item_id, tokens in index.items():
        if item_id in titles:
            sid = "".join(tokens)
            sid2title[sid] = titles[item_id]
            title2sid[titles[item_id]] = sid
    return sid2title, title2sid


def _alignment(sid2title: dict[str, str], title2sid: dict[str, str], n: int, seed: int) -> list[Example]:
    pool = [Example("sid_item_alignment", _prompt(ALIGNMENT_INSTRUCTION, SID_TO_TITLE_INPUT.format(sid=sid)),
                    title + "\n") for sid, title in sid2title.items()]
    pool += [Example("sid_item_alignment", _prompt(ALIGNMENT_INSTRUCTION, TITLE_TO_SID_INPUT.format(title=title)),
                     sid + "\n") for title, sid in title2sid.items()]
    if 0 < n < len(pool):
        pool = random.Random(seed).sample(pool, n)  # MiniOneRec: random.seed(seed); random.sample(data, n)
    return pool


def build_examples(cfg: SidDataConfig, tasks: TasksConfig, split: str, seed: int) -> list[Example]:
    """The examples of a split, task by task (TASKS order), deterministic for a seed.

    "train": the enabled tasks; next-item and fusion over `train_file`, alignment over the index and
    item metadata; `sample_train` examples per task. "eval": next-item over `eval_file`, `sample_eval` rows.
    """
    if split == "train":
        enabled = tasks.enabled()
        csv_key, n = "train_file", cfg.sample_train
    elif split == "eval":
        enabled = ["sid_next_item"]
        csv_key, n = "eval_file", cfg.sample_eval
    else:
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'eval'")
    needs_csv = "sid_next_item" in enabled or "fusion_seq_rec" in enabled
    needs_meta = "sid_item_alignment" in enabled or "fusion_seq_rec" in enabled
    csv_path = getattr(cfg, csv_key)
    # Report every missing file before reading any of them.
    if needs_csv:
        _require_file(csv_key, csv_path)
    _require_file("sid_index_path", cfg.sid_index_path)
    if needs_meta:
        _require_file("item_meta_path", cfg.item_meta_path)

    index = load_index(cfg.sid_index_path)
    sid2title: dict[str, str] = {}
    title2sid: dict[str, str] = {}
    if needs_meta:
        sid2title, title2sid = _sid_maps(index, _load_titles(cfg.item_meta_path))
    rows: list[_Row] = []
    if needs_csv:
        sids = {"".join(tokens) for tokens in index.values()}
        rows = _sample_rows(_read_rows(csv_key, csv_path, sids, cfg.sid_index_path), n, seed)

    examples: list[Example] = []
    if "sid_next_item" in enabled:
        examples += [_next_item(row) for row in rows]
    if "sid_item_alignment" in enabled:
        examples += _alignment(sid2title, title2sid, n, seed)
    if "fusion_seq_rec" in enabled:
        for row in rows:
            if row.target not in sid2title:  # its item has no metadata (MiniOneRec would answer the SID itself)
                raise ConfigError(f"data.item_meta_path: no title for SID {row.target!r} ({cfg.item_meta_path})")
            examples.append(_fusion(row, sid2title))
    return examples


@dataclass
class TokenizedExamples:
    ids: list[np.ndarray] = field(default_factory=list)
    """int32 token ids per example: prompt, response, EOS (left-truncated to max_len)."""
    loss_mask: list[np.ndarray] = field(default_factory=list)
    """bool per token, True where the token is a target (a response token or the EOS)."""
    tasks: list[str] = field(default_factory=list)
    """The task of each example."""

    def __len__(self) -> int:
        return len(self.ids)

    def max_length(self) -> int:
        return max((len(x) for x in self.ids), default=0)

    def batch(self, indices: np.ndarray, length: int, pad_id: int) -> dict[str, np.ndarray]:
        """Examples `indices` as {"input_ids": (B, length) int32 right-padded with pad_id, "loss_mask":
        (B, length) bool, False on padding}; index -1 gives an all-padding filler row."""
        indices = np.asarray(indices).reshape(-1)
        input_ids = np.full((len(indices), length), pad_id, dtype=np.int32)
        loss_mask = np.zeros((len(indices), length), dtype=bool)
        for row, i in enumerate(indices.tolist()):
            if i == -1:
                continue
            if not 0 <= i < len(self.ids):
                raise IndexError(f"example index {i} out of range for {len(self.ids)} examples")
            ids = self.ids[i]
            if len(ids) > length:
                raise ValueError(f"example {i} has {len(ids)} tokens, more than the batch length {length}")
            input_ids[row, : len(ids)] = ids
            loss_mask[row, : len(ids)] = self.loss_mask[i]
        return {"input_ids": input_ids, "loss_mask": loss_mask}


def tokenize(examples: list[Example], tokenizer, eos_id: int, max_len: int) -> TokenizedExamples:
    """Token ids `encode(prompt) + encode(response) + [eos_id]` (no special tokens added by the encoder),
    with the loss on the response and EOS; an example longer than `max_len` loses the start of its
    prompt (MiniOneRec's `tokens[-max_len:]`). `tokenizer` is a `tokenizers.Tokenizer`."""
    out = TokenizedExamples()
    if not examples:
        return out
    prompts = tokenizer.encode_batch([e.prompt for e in examples], add_special_tokens=False)
    responses = tokenizer.encode_batch([e.response for e in examples], add_special_tokens=False)
    for example, prompt, response in zip(examples, prompts, responses):
        p, r = prompt.ids, response.ids
        needed = len(r) + 2  # the response, EOS and at least one prompt token
        if needed > max_len:
            raise ConfigError(
                f"data.max_len: expected at least {needed} to hold a {example.task} example's response + EOS "
                f"and one prompt token, got {max_len} (response {example.response.strip()[:60]!r})")
        ids = np.asarray([*p, *r, eos_id], dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(p):] = True
        out.ids.append(ids[-max_len:])
        out.loss_mask.append(mask[-max_len:])
        out.tasks.append(example.task)
    return out


@dataclass(frozen=True)
class TestPrompt:
    """One SID-evaluation query: MiniOneRec's EvalSidDataset prompt and the SID to predict."""

    __test__ = False  # not a pytest test class

    prompt: str
    """TEMPLATE with EVAL_INSTRUCTION / EVAL_INPUT filled in, ending "### Response:\\n"."""
    target: str
    """The next item's SID, e.g. "<a_1><b_2><c_3>" (no newline)."""


def build_test_prompts(cfg: SidDataConfig, seed: int) -> list[TestPrompt]:
    """The evaluation prompts of `data.test_file`, as MiniOneRec's `EvalSidDataset(test=True)` builds them:
    the history SIDs joined with ", " in EVAL_INPUT, an empty response; `sample_test` rows drawn like
    `DataFrame.sample(n, random_state=seed)` (file order when -1). Every SID must be in the index."""
    _require_file("test_file", cfg.test_file)
    _require_file("sid_index_path", cfg.sid_index_path)
    sids = {"".join(tokens) for tokens in load_index(cfg.sid_index_path).values()}
    rows = _sample_rows(_read_rows("test_file", cfg.test_file, sids, cfg.sid_index_path), cfg.sample_test, seed)
    return [TestPrompt(_prompt(EVAL_INSTRUCTION, EVAL_INPUT.format(history=", ".join(row.history))), row.target)
            for row in rows]


def tokenize_prompts(prompts: list[TestPrompt], tokenizer, max_len: int) -> list[np.ndarray]:
    """int32 token ids of each prompt (no special tokens), left-truncated to its last `max_len` tokens
    like the training data. `tokenizer` is a `tokenizers.Tokenizer`."""
    if not prompts:
        return []
    encoded = tokenizer.encode_batch([p.prompt for p in prompts], add_special_tokens=False)
    return [np.asarray(e.ids[-max_len:], dtype=np.int32) for e in encoded]
