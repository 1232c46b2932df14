"""MiniOneRec semantic-ID (SID) supervised fine-tuning data: pure Python + numpy.

Five tasks, each switchable, built as MiniOneRec's `sft.py` trains them (`data.py`; TASKS is its
ConcatDataset order):

- `sid_next_item` (SidSFTDataset): the SIDs of a user's history -> the SID of the next item (CSV);
- `sid_item_alignment` (SidItemFeatDataset): the title of a SID and the SID of a title, over every item of
  the index that has metadata (reads the index and item JSON files, not the CSV);
- `fusion_seq_rec` (FusionSeqRecDataset): the SIDs of a user's history -> the title of the next item
  (CSV + both JSONs);
- `title_next_item` (SFTData): the titles of a user's history -> the next item's title in quotes, under
  one of 11 instructions drawn per row (CSV; `data.category` names the items);
- `title_history_sid` (TitleHistory2SidSFTDataset): the titles of a user's history -> the SID of the next
  item, looked up by its item_id in the index (CSV + index; `data.category`).

Every example is MiniOneRec's Alpaca-style prompt followed by the response (`output + "\\n"`) and EOS;
the loss covers only the response and EOS. The prompt is carried in MiniOneRec's two pieces, the
instruction block and the rest (`QUERY`), because MiniOneRec encodes them separately
(`encode(instruction) + encode(rest)`), which for some tokenizers differs from encoding their
concatenation. Sampling matches MiniOneRec for a given seed: CSV tasks draw the rows
`pandas.DataFrame.sample(n, random_state=seed)` would draw (the same rows for every CSV task),
alignment draws `random.Random(seed).sample(examples, n)`, and `title_next_item` draws its
instructions with `random.Random(seed).randint` row by row.

The SID evaluation (constrained beam search) reads `test_file` through `build_test_prompts`:
MiniOneRec's EvalSidDataset prompts (`EVAL_INSTRUCTION`, `EVAL_INPUT`), each with its target SID.
"""

from __future__ import annotations

import ast
import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Literal

import numpy as np

from mllm_jax.config import ConfigError

HEADER = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request. \n\n### Instruction:\n")
"""The start of every SFT prompt; the instruction and its block end follow."""
QUERY = "### User Input: \n{input}\n\n### Response:\n"
"""The prompt after the instruction block (MiniOneRec's `generate_prompt` with an empty output); MiniOneRec's
RL prompts are this alone."""
TEMPLATE = HEADER + "{instruction}\n\n" + QUERY

TASKS = ("sid_next_item", "sid_item_alignment", "fusion_seq_rec", "title_next_item", "title_history_sid")

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
# SFTData: one of these per row (its typos and "gaming" wording verbatim); its block ends "\n \n".
TITLE_NEXT_INSTRUCTIONS = (
    "Given a list of {category} the user recetenly enjoy, please write a new {category} that the user may bought",
    "Considering the {category} that has recently captured the user's interest, kindly create a compilation of "
    "other {category} that the user might have played prior to this.",
    "Based on the user's current gaming preference, please draft a list of potential {category} they may have "
    "experienced beforehand.",
    "Reflecting on the {category} the user has taken pleasure in recently, we request that you formulate a list "
    "of {category} that may have preceded the user's current enjoyment.",
    "In light of the recent gaming enjoyment expressed by the user, please assemble a list of {category} that "
    "could potentially include past titles the user has engaged with.",
    "Taking into account the {category} that has lately provided enjoyment to the user, please put together an "
    "inventory of {category} the user might have explored previously.",
    "Given the user's newfound enjoyment of a particular {category}, would you kindly generate a roster of other "
    "{category} that might resonate with their past gaming experiences?",
    "In response to the user's recent fondness for a specific {category}, we seek your assistance in listing "
    "possible {category} the user may have delighted in earlier.",
    "With respect to the {category} currently enjoyed by the user, please compile a suggestive list of "
    "{category} they may have played in the past.",
    "Bearing in mind the {category} that the user has recently been enthralled by, please construct a catalog "
    "of other {category} that the user potentially partook in beforehand.",
    "In relation to the user's recent entertainment with a given {category}, it would be appreciated if you "
    "could curate a list of {category} that might form part of the user's previous gaming history.",
)
TITLE_NEXT_INPUT = "The user has palyed the following {category}s before: {history}"
TITLE_HISTORY_SID_INSTRUCTION = ("Based on the user's historical interaction with item titles, predict the "
                                 "semantic ID of the next item they may expect.")
TITLE_HISTORY_SID_INPUT = ("The user has interacted with the following {category} items in chronological "
                           "order: {history}. Can you predict the next item the user may expect?")

EVAL_INSTRUCTION = "Can you predict the next possible item that the user may expect?"
EVAL_INPUT = ("Can you predict the next possible item the user may expect, "
              "given the following chronological interaction history: {history}")

CATEGORIES = {
    "Industrial_and_Scientific": "industrial and scientific items",
    "Office_Products": "office products",
    "Toys_and_Games": "toys and games",
    "Sports": "sports and outdoors",
    "Books": "books",
}
"""MiniOneRec's category_dict: `data.category` -> the phrase its prompts use."""
Category = Literal[tuple(CATEGORIES)]  # type: ignore[valid-type]  # the config loader checks the value against these
CATEGORY_TASKS = ("title_next_item", "title_history_sid")
"""The tasks whose prompts name the category."""

CSV_COLUMNS = ("history_item_sid", "item_sid", "history_item_title", "item_title", "item_id")
"""The MiniOneRec CSV columns read (others, e.g. user_id and history_item_id, are ignored)."""
TASK_COLUMNS = {
    "sid_next_item": ("history_item_sid", "item_sid"),
    "sid_item_alignment": (),
    "fusion_seq_rec": ("history_item_sid", "item_sid"),
    "title_next_item": ("history_item_title", "item_title"),
    "title_history_sid": ("history_item_title", "item_id"),
}
"""The CSV columns each task reads; a column is read only when an enabled task needs it."""
META_TASKS = ("sid_item_alignment", "fusion_seq_rec")
"""The tasks that read item titles from `data.item_meta_path`."""


def check_samples(cfg: object, keys: tuple[str, ...]) -> None:
    """data.<key> must be -1 (all) or a positive integer, for each key."""
    for key in keys:
        value = getattr(cfg, key)
        if not isinstance(value, int) or value == 0 or value < -1:
            raise ConfigError(f"data.{key}: expected -1 (all) or a positive integer, got {value!r}")


@dataclass
class SidDataConfig:
    """The `data:` section of the sft recipe: MiniOneRec's files, read by path."""

    train_file: str | None = None
    """MiniOneRec CSV for training (`.../train/*.csv` upstream); every task but alignment reads it. Columns
    read (only those an enabled task needs): `history_item_sid` (a Python-literal list of SIDs) and
    `item_sid` (next-item, fusion), `history_item_title` (a Python-literal list of titles) and `item_title`
    (title_next_item), `history_item_title` and `item_id` (title_history_sid)."""
    eval_file: str | None = None
    """CSV for the held-out eval loss (next-item task only, like MiniOneRec's validation set)."""
    sid_index_path: str | None = None
    """`*.index.json`: item id -> SID tokens, e.g. ["<a_1>", "<b_2>", "<c_3>"]. Always needed: every SID
    of the CSVs (and every item_id title_history_sid reads) must be in it, and its tokens are the ones
    added to the tokenizer."""
    item_meta_path: str | None = None
    """`*.item.json`: item id -> {title, ...}; needed by the alignment and fusion tasks (titles)."""
    category: Category | None = None
    """MiniOneRec's `--category`, a key of its category_dict (Industrial_and_Scientific, Office_Products,
    Toys_and_Games, Sports, Books); the title_next_item and title_history_sid prompts name its phrase
    (CATEGORIES), so they need it."""
    max_len: int = 512
    """Tokens per example (MiniOneRec's cutoff_len); longer examples lose the start of their prompt."""
    sample_train: int = -1
    """Examples per training task drawn with the seed (CSV rows, or alignment pairs); -1 = all."""
    sample_eval: int = -1
    """Rows of eval_file drawn with the seed; -1 = all."""
    test_file: str | None = None
    """CSV whose next items the SID evaluation predicts (constrained beam search); MiniOneRec's
    `.../test/*.csv`, with the columns `history_item_sid` and `item_sid`."""
    sample_test: int = -1
    """Rows of test_file drawn with the seed; -1 = all."""

    def validate(self) -> None:
        if not isinstance(self.max_len, int) or self.max_len < 8:
            raise ConfigError(f"data.max_len: expected an integer >= 8, got {self.max_len!r}")
        check_samples(self, ("sample_train", "sample_eval", "sample_test"))
        if self.category is not None and self.category not in CATEGORIES:
            raise ConfigError(f"data.category: expected one of {', '.join(CATEGORIES)}, got {self.category!r}")


class TaskSwitches:
    """enabled() and validate() of a `tasks:` section: one bool field per name of `names`."""

    names: ClassVar[tuple[str, ...]]

    def enabled(self) -> list[str]:
        return [name for name in self.names if getattr(self, name)]

    def validate(self) -> None:
        if not self.enabled():
            raise ConfigError(f"tasks: expected at least one of {', '.join(self.names)} to be true")


@dataclass
class TasksConfig(TaskSwitches):
    """The `tasks:` section of the sft recipe: which MiniOneRec SFT tasks make up the training data
    (all five by default, as MiniOneRec's sft.py trains them)."""

    names = TASKS
    sid_next_item: bool = True
    """History SIDs -> next item's SID (SidSFTDataset)."""
    sid_item_alignment: bool = True
    """SID -> title and title -> SID for every indexed item (SidItemFeatDataset)."""
    fusion_seq_rec: bool = True
    """History SIDs -> next item's title (FusionSeqRecDataset)."""
    title_next_item: bool = True
    """History titles -> next item's title in quotes, one of 11 instructions per row (SFTData); needs
    data.category."""
    title_history_sid: bool = True
    """History titles -> next item's SID (TitleHistory2SidSFTDataset); needs data.category."""


@dataclass(frozen=True)
class Example:
    task: str
    """One of TASKS."""
    instruction: str
    """The instruction block: HEADER, the task's instruction and the block's end ("\\n\\n"; SFTData's
    "\\n \\n"). Tokenized on its own, as MiniOneRec does."""
    query: str
    """The rest of the prompt: QUERY filled in, ending "### Response:\\n"."""
    response: str
    """The target text, `output + "\\n"` (EOS is appended at tokenization)."""

    @property
    def prompt(self) -> str:
        """Everything before the response: instruction + query."""
        return self.instruction + self.query


def _example(task: str, instruction: str, input_: str, response: str, block_end: str = "\n\n") -> Example:
    return Example(task, HEADER + instruction + block_end, QUERY.format(input=input_), response)


def require_file(key: str, path: str | None) -> Path:
    """`path` as a Path; a one-line ConfigError naming data.<key> when it is unset or not a file."""
    if not path:
        raise ConfigError(f"data.{key}: expected a file path, got {path!r}")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.{key}: file not found: {path}")
    return p


def _read_json(key: str, path: str) -> object:
    p = require_file(key, path)
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
        bad = next((t for t in tokens if not _SID_TOKEN.fullmatch(t)), None)
        if bad is not None:
            raise ConfigError(f"data.sid_index_path: {path}: item {item_id!r}: SID token {_short(bad)} is not a "
                              "single word in angle brackets like <a_12> (no spaces, control characters or '|')")
    return raw


_SID_TOKEN = re.compile(r"<[^\s<>|]+>")
"""A SID token: one added word such as <a_12>. Whitespace or a control character would be split
or mangled by the prompt's formatting; <|...|> is the form of the tokenizer's special tokens."""


def collisions(index: dict[str, list[str]]) -> str | None:
    """A note on SIDs that two or more items share (None: every SID names one item). MiniOneRec's
    indexes have a few (RQ-VAE codes collide); a hit on such a SID counts for each of its items,
    as upstream, so they are shown, not refused."""
    items: dict[str, list[str]] = {}
    for item_id, tokens in index.items():
        items.setdefault("".join(tokens), []).append(item_id)
    shared = {s: ids for s, ids in items.items() if len(ids) > 1}
    if not shared:
        return None
    sid_, ids = next(iter(shared.items()))
    return (f"note: data.sid_index_path: {len(shared)} of {len(items)} SIDs are shared by several items "
            f"(e.g. {sid_}: items {', '.join(ids[:3])}); the evaluation, like MiniOneRec's, cannot tell them apart")


def sid_tokens(index: dict[str, list[str]]) -> list[str]:
    """The distinct SID tokens of an index, sorted: the tokens to add to the tokenizer
    (MiniOneRec's TokenExtender.get_new_tokens)."""
    return sorted({token for tokens in index.values() for token in tokens})


def sid_strings(index: dict[str, list[str]]) -> set[str]:
    """The SID string of every item of an index ("".join of its tokens)."""
    return {"".join(tokens) for tokens in index.values()}


def load_item_field(path: str, name: str) -> dict[str, str]:
    """item id -> the string field `name` (title, description) of every item of the `*.item.json` file."""
    raw = _read_json("item_meta_path", path)
    if not isinstance(raw, dict):
        raise ConfigError(f"data.item_meta_path: {path}: expected a JSON object of item id -> {{title, ...}}")
    values = {}
    for item_id, meta in raw.items():
        if not isinstance(meta, dict) or not isinstance(meta.get(name), str):
            raise ConfigError(f"data.item_meta_path: {path}: item {item_id!r} has no string {name!r}")
        values[item_id] = meta[name]
    return values


def to_sid(index: dict[str, list[str]], values: dict[str, str]) -> dict[str, str]:
    """MiniOneRec's title2sid (or description2sid): value -> SID over the index items that have a value,
    in index order, a later item overwriting an earlier one with the same value."""
    return {values[item_id]: "".join(tokens) for item_id, tokens in index.items() if item_id in values}


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Row:
    """One row of a MiniOneRec CSV: the columns read (of CSV_COLUMNS); the others keep their defaults."""

    number: int
    """1 for the first row after the header, as the errors count."""
    history: list[str] = field(default_factory=list)
    """history_item_sid: the SIDs of the user's history."""
    target: str = ""
    """item_sid: the next item's SID."""
    history_titles: list[str] = field(default_factory=list)
    """history_item_title: the titles of the user's history."""
    title: str = ""
    """item_title: the next item's title, as written (pandas keeps its spaces)."""
    item_id: str = ""
    """item_id: the next item's key in the index."""


_ROW_FIELDS = {"history_item_sid": "history", "item_sid": "target", "history_item_title": "history_titles",
               "item_title": "title", "item_id": "item_id"}
_LIST_COLUMNS = {"history_item_sid": "SID strings", "history_item_title": "strings"}
_SID_COLUMNS = ("history_item_sid", "item_sid")


def read_rows(key: str, path: str, columns: tuple[str, ...], sids: set[str], index_path: str) -> list[Row]:
    """The `columns` (of CSV_COLUMNS) of every row of the MiniOneRec CSV `data.<key>`, each SID checked
    against `sids` (of the index at `index_path`); bad input is a one-line ConfigError."""
    p = require_file(key, path)
    try:
        with p.open(encoding="utf-8-sig", newline="") as f:
            return _parse_rows(csv.reader(f), key, path, columns, sids, index_path)
    except (UnicodeDecodeError, csv.Error) as e:  # a binary file
        why = f"byte {e.start} is not UTF-8" if isinstance(e, UnicodeDecodeError) else str(e)
        raise ConfigError(f"data.{key}: {path} is not a UTF-8 CSV file ({why})") from None


def _parse_rows(reader: Iterator[list[str]], key: str, path: str, columns: tuple[str, ...], sids: set[str],
                index_path: str) -> list[Row]:
    """read_rows's checks, row by row, over an open CSV reader."""
    rows: list[Row] = []
    header = next(reader, None)
    if not header:
        raise ConfigError(f"data.{key}: {path} is empty (expected a header with {', '.join(columns)})")
    names = [c.strip() for c in header]
    for name in columns:
        if name not in names:
            raise ConfigError(f"data.{key}: {path} has no column {name!r} (columns: {_short(', '.join(names))})")
    where_col = {name: names.index(name) for name in columns}
    need = max(where_col.values(), default=-1) + 1
    for n, record in enumerate(reader, start=1):
        where = f"data.{key} row {n}"
        if not record:
            continue  # a blank line (pandas skips it too)
        if len(record) < need:
            raise ConfigError(f"{where}: expected {len(names)} fields, got {len(record)} ({path})")
        row = Row(n)
        for name, col in where_col.items():
            setattr(row, _ROW_FIELDS[name], _cell(name, record[col], where, path, sids, index_path))
        rows.append(row)
    return rows


def _cell(name: str, text: str, where: str, path: str, sids: set[str], index_path: str) -> list[str] | str:
    """The value of one CSV cell of column `name`, checked."""
    if name in _LIST_COLUMNS:  # MiniOneRec eval()s it: a Python list literal is all it should hold
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
        if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise ConfigError(f"{where}: column {name!r} is not a Python list of {_LIST_COLUMNS[name]}: "
                              f"{_short(text)} ({path})")
    else:
        value = text if name == "item_title" else text.strip()
        if not value.strip():  # pandas reads NaN there (MiniOneRec would train on "nan")
            raise ConfigError(f"{where}: column {name!r} is empty ({path})")
    if name in _SID_COLUMNS:
        for sid in value if isinstance(value, list) else [value]:
            if sid not in sids:
                raise ConfigError(f"{where}: SID {sid!r} is not in data.sid_index_path ({index_path})")
    return value


def sample_rows(rows: list, n: int, seed: int) -> list:
    """`n` rows as `pandas.DataFrame.sample(n, random_state=seed)` draws them (MiniOneRec's CSV datasets);
    n == -1 keeps every row in file order, and so does n > the number of rows (where pandas raises)."""
    if n < 0 or n > len(rows):
        return list(rows)
    picks = np.random.RandomState(seed % 2**32).choice(len(rows), size=n, replace=False)
    return [rows[i] for i in picks]


def sample_pairs(pool: list, n: int, seed: int) -> list:
    """MiniOneRec's `random.seed(seed); random.sample(data, n)` when 0 < n < len(data); else all of it."""
    return random.Random(seed).sample(pool, n) if 0 < n < len(pool) else list(pool)


def _next_item(row: Row) -> Example:
    return _example("sid_next_item", NEXT_ITEM_INSTRUCTION, NEXT_ITEM_INPUT.format(history=", ".join(row.history)),
                    row.target + "\n")


def _alignment(index: dict[str, list[str]], titles: dict[str, str], n: int, seed: int) -> list[Example]:
    pool = [_example("sid_item_alignment", ALIGNMENT_INSTRUCTION, SID_TO_TITLE_INPUT.format(sid=sid), title + "\n")
            for sid, title in _sid2title(index, titles).items()]
    pool += [_example("sid_item_alignment", ALIGNMENT_INSTRUCTION, TITLE_TO_SID_INPUT.format(title=title), sid + "\n")
             for title, sid in to_sid(index, titles).items()]
    return sample_pairs(pool, n, seed)


def _sid2title(index: dict[str, list[str]], titles: dict[str, str]) -> dict[str, str]:
    """MiniOneRec's sid2title: SID -> title over the index items that have a title, in index order, a
    later item overwriting an earlier one with the same SID."""
    return {"".join(tokens): titles[item_id] for item_id, tokens in index.items() if item_id in titles}


def _fusion(row: Row, sid2title: dict[str, str], meta_path: str) -> Example:
    if row.target not in sid2title:  # its item has no metadata (MiniOneRec would answer the SID itself)
        raise ConfigError(f"data.item_meta_path: no title for SID {row.target!r} ({meta_path})")
    return _example("fusion_seq_rec", FUSION_INSTRUCTION, FUSION_INPUT.format(history=", ".join(row.history)),
                    sid2title[row.target] + "\n")


def _title_next_items(rows: list[Row], category: str, seed: int) -> list[Example]:
    rng = random.Random(seed)  # SFTData: random.seed(seed), then one randint per row in sampled order
    instructions = [text.format(category=category) for text in TITLE_NEXT_INSTRUCTIONS]
    out = []
    for row in rows:
        instruction = instructions[rng.randint(0, len(instructions) - 1)]
        history = ",\t".join(f'"{title}"' for title in row.history_titles)
        out.append(_example("title_next_item", instruction, TITLE_NEXT_INPUT.format(category=category, history=history),
                            f'"{row.title}"\n', block_end="\n \n"))
    return out


def _title_history_sid(row: Row, index: dict[str, list[str]], category: str, csv_key: str,
                       index_path: str) -> Example:
    if row.item_id not in index:  # MiniOneRec would silently answer the raw item id instead of a SID
        raise ConfigError(f"data.{csv_key} row {row.number}: item_id {row.item_id!r} is not in "
                          f"data.sid_index_path ({index_path})")
    history = ", ".join(f'"{title}"' for title in row.history_titles)
    return _example("title_history_sid", TITLE_HISTORY_SID_INSTRUCTION,
                    TITLE_HISTORY_SID_INPUT.format(category=category, history=history),
                    "".join(index[row.item_id]) + "\n")


def build_examples(cfg: SidDataConfig, tasks: TasksConfig, split: str, seed: int) -> list[Example]:
    """The examples of a split, task by task (TASKS order), deterministic for a seed.

    "train": the enabled tasks; the CSV tasks over `train_file` (the same sampled rows for each),
    alignment over the index and item metadata; `sample_train` examples per task. "eval": next-item over
    `eval_file`, `sample_eval` rows.
    """
    if split == "train":
        enabled = tasks.enabled()
        csv_key, n = "train_file", cfg.sample_train
    elif split == "eval":
        enabled = ["sid_next_item"]
        csv_key, n = "eval_file", cfg.sample_eval
    else:
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'eval'")
    columns = tuple(c for c in CSV_COLUMNS if any(c in TASK_COLUMNS[t] for t in enabled))
    needs_meta = any(t in META_TASKS for t in enabled)
    needs_category = [t for t in enabled if t in CATEGORY_TASKS]
    if needs_category and cfg.category not in CATEGORIES:
        raise ConfigError(f"data.category: expected one of {', '.join(CATEGORIES)} (the tasks "
                          f"{', '.join(needs_category)} name it), got {cfg.category!r}")
    csv_path = getattr(cfg, csv_key)
    # Report every missing file before reading any of them.
    if columns:
        require_file(csv_key, csv_path)
    require_file("sid_index_path", cfg.sid_index_path)
    if needs_meta:
        require_file("item_meta_path", cfg.item_meta_path)

    index = load_index(cfg.sid_index_path)
    titles = load_item_field(cfg.item_meta_path, "title") if needs_meta else {}
    rows: list[Row] = []
    if columns:
        rows = sample_rows(read_rows(csv_key, csv_path, columns, sid_strings(index), cfg.sid_index_path), n, seed)
    category = CATEGORIES.get(cfg.category or "", "")

    examples: list[Example] = []
    if "sid_next_item" in enabled:
        examples += [_next_item(row) for row in rows]
    if "sid_item_alignment" in enabled:
        examples += _alignment(index, titles, n, seed)
    if "fusion_seq_rec" in enabled:
        sid2title = _sid2title(index, titles)
        examples += [_fusion(row, sid2title, cfg.item_meta_path) for row in rows]
    if "title_next_item" in enabled:
        examples += _title_next_items(rows, category, seed)
    if "title_history_sid" in enabled:
        examples += [_title_history_sid(row, index, category, csv_key, cfg.sid_index_path) for row in rows]
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


def encode_pieces(tokenizer, pieces: list[tuple[str, ...]]) -> list[list[int]]:
    """The token ids of each tuple: its strings encoded separately (no special tokens added) and
    concatenated, as MiniOneRec encodes a prompt's instruction block and its rest. All tuples have the
    same length. `tokenizer` is a `tokenizers.Tokenizer`."""
    if not pieces:
        return []
    columns = [tokenizer.encode_batch([p[i] for p in pieces], add_special_tokens=False) for i in range(len(pieces[0]))]
    return [[t for column in columns for t in column[k].ids] for k in range(len(pieces))]


def encode_prompts(pieces: list[tuple[str, ...]], tokenizer, max_len: int) -> list[np.ndarray]:
    """int32 token ids of each prompt (`encode_pieces`), left-truncated to its last `max_len` tokens."""
    return [np.asarray(ids[-max_len:], dtype=np.int32) for ids in encode_pieces(tokenizer, pieces)]


def tokenize(examples: list[Example], tokenizer, eos_id: int, max_len: int) -> TokenizedExamples:
    """Token ids `encode(instruction) + encode(query) + encode(response) + [eos_id]` (each piece on its
    own, no special tokens added by the encoder: MiniOneRec's ids), with the loss on the response and
    EOS; an example longer than `max_len` loses the start of its prompt (MiniOneRec's
    `tokens[-max_len:]`). `tokenizer` is a `tokenizers.Tokenizer`."""
    out = TokenizedExamples()
    prompts = encode_pieces(tokenizer, [(e.instruction, e.query) for e in examples])
    responses = encode_pieces(tokenizer, [(e.response,) for e in examples])
    for example, p, r in zip(examples, prompts, responses):
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

    instruction: str
    """HEADER + EVAL_INSTRUCTION + "\\n\\n", tokenized on its own as MiniOneRec does."""
    query: str
    """QUERY with EVAL_INPUT filled in, ending "### Response:\\n"."""
    target: str
    """The next item's SID, e.g. "<a_1><b_2><c_3>" (no newline)."""

    @property
    def prompt(self) -> str:
        return self.instruction + self.query


def build_test_prompts(test_file: str | None, sid_index_path: str | None, sample: int, seed: int) -> list[TestPrompt]:
    """The evaluation prompts of `test_file` (data.test_file), as MiniOneRec's `EvalSidDataset(test=True)`
    builds them: the history SIDs joined with ", " in EVAL_INPUT, an empty response; `sample` rows drawn like
    `DataFrame.sample(n, random_state=seed)` (file order when -1). Every SID must be in the index."""
    require_file("test_file", test_file)
    require_file("sid_index_path", sid_index_path)
    sids = sid_strings(load_index(sid_index_path))
    rows = sample_rows(read_rows("test_file", test_file, ("history_item_sid", "item_sid"), sids, sid_index_path),
                       sample, seed)
    out = []
    for row in rows:
        e = _example("eval", EVAL_INSTRUCTION, EVAL_INPUT.format(history=", ".join(row.history)), "")
        out.append(TestPrompt(e.instruction, e.query, row.target))
    return out


def tokenize_prompts(prompts: list[TestPrompt], tokenizer, max_len: int) -> list[np.ndarray]:
    """int32 token ids of each prompt, `encode(instruction) + encode(query)` (no special tokens, as
    MiniOneRec's EvalSidDataset), left-truncated to its last `max_len` tokens like the training data.
    `tokenizer` is a `tokenizers.Tokenizer`."""
    return encode_prompts([(p.instruction, p.query) for p in prompts], tokenizer, max_len)
