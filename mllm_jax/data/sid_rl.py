"""MiniOneRec's RL prompts: the prompts its `rl.py` trains on, each with the SID it should answer.

Three tasks, each switchable, in rl.py's ConcatDataset order (`data.py`):

- `sid_next_item` (SidDataset): the SIDs of a user's history -> the next item's SID (CSV);
- `item_to_sid` (RLTitle2SidDataset): an item's title, then an item's description -> its SID, over every
  item of the index that has metadata (index + item JSON);
- `title_history_sid` (RLSeqTitle2SidDataset): the titles of a user's history -> the next item's SID (CSV).

A prompt is `sid.QUERY` filled in, with no Alpaca instruction header, as MiniOneRec's RL datasets write it;
the policy's completion is scored against `RlPrompt.target`. MiniOneRec's reward instead looks the target
up through `history2target[prompt2history[prompt]]`, dicts merged over all datasets with the last writer
winning, so prompts that share a "history" string (the same SID history, or a title equal to a one-item
title history) get another row's target; here every prompt keeps its own row's target.

Sampling matches MiniOneRec for a given seed (its rl.py builds these datasets with their default seed 0):
CSV tasks draw rows like `pandas.DataFrame.sample(n, random_state=seed)`, item_to_sid draws pairs like
`random.seed(seed); random.sample(data, n)`. The RL recipe's SID evaluation reuses `sid.build_test_prompts`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np

from mllm_jax.config import ConfigError
from mllm_jax.data import sid

RL_TASKS = ("sid_next_item", "item_to_sid", "title_history_sid")

DESCRIPTION_TO_SID_INPUT = 'An item can be described as follows: "{description}". Which item is it describing?'
TITLE_HISTORY_INPUT = ("Given the title sequence of user historical interactive items: {titles}, "
                       "can you recommend a suitable next item for the user?")
TASK_COLUMNS = {"sid_next_item": ("history_item_sid", "item_sid"), "item_to_sid": (),
                "title_history_sid": ("history_item_title", "item_sid")}
"""The CSV columns each task reads; a column is read only when an enabled task needs it."""


@dataclass
class RlTasksConfig(sid.TaskSwitches):
    """The `tasks:` section of an RL recipe: which MiniOneRec RL prompt sets make up the training prompts
    (all three by default, as MiniOneRec's rl.py trains them)."""

    names = RL_TASKS
    sid_next_item: bool = True
    """History SIDs -> next item's SID (SidDataset)."""
    item_to_sid: bool = True
    """Title -> SID, then description -> SID, for every indexed item with metadata (RLTitle2SidDataset)."""
    title_history_sid: bool = True
    """History titles -> next item's SID (RLSeqTitle2SidDataset)."""


@dataclass
class RlDataConfig:
    """The `data:` section of an RL recipe: MiniOneRec's files, read by path."""

    train_file: str | None = None
    """MiniOneRec CSV of the training rows (`.../train/*.csv` upstream), read by sid_next_item
    (`history_item_sid`, `item_sid`) and title_history_sid (`history_item_title`, `item_sid`)."""
    sid_index_path: str | None = None
    """`*.index.json`: item id -> SID tokens. Always needed: every SID of the CSVs must be in it, and its
    tokens are the ones added to the tokenizer."""
    item_meta_path: str | None = None
    """`*.item.json`: item id -> {title, description, ...}; needed by item_to_sid."""
    max_prompt_len: int = 512
    """TRL's max_prompt_length: a longer prompt keeps only its last max_prompt_len tokens."""
    sample_train: int = -1
    """Prompts drawn with the seed for sid_next_item (CSV rows) and item_to_sid (pairs); -1 = all
    (MiniOneRec's rl.py: all)."""
    sample_title_history: int = 10000
    """CSV rows drawn with the seed for title_history_sid; -1 = all (MiniOneRec's rl.py: 10000)."""
    test_file: str | None = None
    """CSV whose next items the SID evaluation predicts (`sid.build_test_prompts`); MiniOneRec's
    `.../test/*.csv`."""
    sample_test: int = -1
    """Rows of test_file drawn with the seed; -1 = all."""

    def validate(self) -> None:
        if not isinstance(self.max_prompt_len, int) or self.max_prompt_len < 1:
            raise ConfigError(f"data.max_prompt_len: expected a positive integer, got {self.max_prompt_len!r}")
        sid.check_samples(self, ("sample_train", "sample_title_history", "sample_test"))


@dataclass(frozen=True)
class RlPrompt:
    task: str
    """One of RL_TASKS."""
    prompt: str
    """`sid.QUERY` filled in: "### User Input: \\n{input}\\n\\n### Response:\\n"."""
    target: str
    """The SID to answer, without newline, e.g. "<a_1><b_2><c_3>"."""


def _first_description(description: str) -> str:
    """RLTitle2SidDataset's cleanup: a description written as a Python list ("['...', ...]") becomes its
    first element (MiniOneRec eval()s it; a string that does not parse stays as it is)."""
    if description.startswith("['") and description.endswith("']"):
        try:
            parsed = ast.literal_eval(description)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return description
        if isinstance(parsed, list) and parsed and isinstance(parsed[0], str):
            return parsed[0]
    return description


def _item_to_sid(index: dict[str, list[str]], meta_path: str, n: int, seed: int) -> list[RlPrompt]:
    titles = sid.load_item_field(meta_path, "title")
    descriptions = {item_id: _first_description(text)
                    for item_id, text in sid.load_item_field(meta_path, "description").items()}
    pool = [RlPrompt("item_to_sid", sid.QUERY.format(input=sid.TITLE_TO_SID_INPUT.format(title=title)), target)
            for title, target in sid.to_sid(index, titles).items()]
    pool += [RlPrompt("item_to_sid", sid.QUERY.format(input=DESCRIPTION_TO_SID_INPUT.format(description=d)), target)
             for d, target in sid.to_sid(index, descriptions).items()]
    return sid.sample_pairs(pool, n, seed)


def build_rl_prompts(cfg: RlDataConfig, tasks: RlTasksConfig, seed: int) -> list[RlPrompt]:
    """The training prompts, task by task in RL_TASKS order, deterministic for a seed (MiniOneRec's rl.py
    builds them with seed 0). Every target is a SID of the index; bad input is a one-line ConfigError."""
    enabled = tasks.enabled()
    columns = tuple(c for c in sid.CSV_COLUMNS if any(c in TASK_COLUMNS[t] for t in enabled))
    # Report every missing file before reading any of them.
    if columns:
        sid.require_file("train_file", cfg.train_file)
    sid.require_file("sid_index_path", cfg.sid_index_path)
    if "item_to_sid" in enabled:
        sid.require_file("item_meta_path", cfg.item_meta_path)

    index = sid.load_index(cfg.sid_index_path)
    rows = sid.read_rows("train_file", cfg.train_file, columns, sid.sid_strings(index), cfg.sid_index_path) \
        if columns else []
    prompts: list[RlPrompt] = []
    if "sid_next_item" in enabled:
        prompts += [RlPrompt("sid_next_item", sid.QUERY.format(input=sid.NEXT_ITEM_INPUT.format(
            history=", ".join(row.history))), row.target) for row in sid.sample_rows(rows, cfg.sample_train, seed)]
    if "item_to_sid" in enabled:
        prompts += _item_to_sid(index, cfg.item_meta_path, cfg.sample_train, seed)
    if "title_history_sid" in enabled:
        for row in sid.sample_rows(rows, cfg.sample_title_history, seed):
            titles = ", ".join(f'"{title}"' for title in row.history_titles)
            prompts.append(RlPrompt("title_history_sid", sid.QUERY.format(input=TITLE_HISTORY_INPUT.format(
                titles=titles)), row.target))
    return prompts


def tokenize_prompts(prompts: list[RlPrompt], tokenizer, max_len: int) -> list[np.ndarray]:
    """int32 token ids of each whole prompt (no special tokens, as TRL's GRPO trainer encodes it),
    left-truncated to its last `max_len` tokens (data.max_prompt_len). `tokenizer` is a
    `tokenizers.Tokenizer`."""
    return sid.encode_prompts([(p.prompt,) for p in prompts], tokenizer, max_len)
