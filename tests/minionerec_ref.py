"""A test reference: a port of MiniOneRec's data.py (github.com/AkaliKong/MiniOneRec, Apache-2.0) at
commit 81b4ba9811cfb152cf161f1c486fe516510d081e, the datasets its sft.py and rl.py train on.

Rewritten compactly, following its logic step by step: pandas.read_csv, eval of the list columns,
random.seed(seed) with DataFrame.sample(n, random_state=seed) / random.sample, its prompt f-strings, and
its Tokenizer.encode, which encodes each piece with the Hugging Face tokenizer and handles BOS/EOS itself.
The SFT datasets return MiniOneRec's tokenized rows (input_ids, labels) plus the prompt text; the RL
datasets return (prompt, completion) rows and their prompt2history / history2target dicts.
Only the code paths sft.py / rl.py use are ported (test=False, dedup=False).
"""

from __future__ import annotations

import json
import random

import pandas as pd

CATEGORY_DICT = {"Industrial_and_Scientific": "industrial and scientific items", "Office_Products": "office products",
                 "Toys_and_Games": "toys and games", "Sports": "sports and outdoors", "Books": "books"}

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request. \n\n### Instruction:\n")


def user_input(text: str) -> str:
    """Their generate_prompt(data_point) with an empty output."""
    return f"### User Input: \n{text}\n\n### Response:\n"


class Encoder:
    """Their Tokenizer: encode with the HF tokenizer's defaults, strip BOS / EOS, add them back on request."""

    def __init__(self, hf_tokenizer):
        self.tok, self.bos_id, self.eos_id = hf_tokenizer, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        t = self.tok.encode(s)
        while t[0] == self.bos_id:
            t = t[1:]
        while t[-1] == self.eos_id:
            t = t[:-1]
        return ([self.bos_id] if bos and self.bos_id is not None else []) + t + \
            ([self.eos_id] if eos and self.eos_id is not None else [])


def sft_row(enc: Encoder, instruction: str, prompt: str, target: str, max_len: int) -> dict:
    """Every SFT dataset's pre(): instruction and prompt encoded apart, then the target with EOS."""
    tokens = enc.encode(instruction, bos=True, eos=False) + enc.encode(prompt, bos=False, eos=False)
    prompt_len = len(tokens)
    tokens = tokens + enc.encode(target, bos=False, eos=True)
    labels = [-100] * prompt_len + tokens[prompt_len:]
    return {"input_ids": tokens[-max_len:], "labels": labels[-max_len:], "prompt": instruction + prompt}


def _read(train_file: str, sample: int, seed: int) -> pd.DataFrame:
    data = pd.read_csv(train_file)
    random.seed(seed)
    return data.sample(sample, random_state=seed) if sample > 0 else data


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _sid(sids: list[str]) -> str:
    return sids[0] + sids[1] + sids[2]


# ---- sft.py's five datasets, in its ConcatDataset order ----

def sid_sft(train_file, enc, max_len, sample, seed):
    """SidSFTDataset."""
    out = []
    for _, row in _read(train_file, sample, seed).iterrows():
        history = ", ".join(eval(row["history_item_sid"]))
        text = (f"The user has interacted with items {history} in chronological order. "
                "Can you predict the next possible item that the user may expect?")
        out.append(sft_row(enc, ALPACA + "Can you predict the next possible item that the user may expect?\n\n",
                           user_input(text), str(row["item_sid"]) + "\n", max_len))
    return out


def _sid2title_title2sid(item_file, index_file):
    items, index = _json(item_file), _json(index_file)
    sid2title, title2sid = {}, {}
    for item_id, sids in index.items():
        if item_id in items and len(sids) >= 3:
            sid2title[_sid(sids)] = items[item_id]["title"]
            title2sid[items[item_id]["title"]] = _sid(sids)
    return sid2title, title2sid


def sid_item_feat(item_file, index_file, enc, max_len, sample, seed):
    """SidItemFeatDataset."""
    random.seed(seed)
    sid2title, title2sid = _sid2title_title2sid(item_file, index_file)
    data = [("sid2title", s, t) for s, t in sid2title.items()] + [("title2sid", t, s) for t, s in title2sid.items()]
    if 0 < sample < len(data):
        data = random.sample(data, sample)
    out = []
    for task, given, answer in data:
        question = f"Which item has the title: {given}?" if task == "title2sid" else \
            f'What is the title of item "{given}"?'
        out.append(sft_row(enc, ALPACA + "Answer the question about item identification.\n\n", user_input(question),
                           answer + "\n", max_len))
    return out


def fusion_seq_rec(train_file, item_file, index_file, enc, max_len, sample, seed):
    """FusionSeqRecDataset (its title task; the description branch is commented out upstream)."""
    data = _read(train_file, sample, seed)
    sid2title, _ = _sid2title_title2sid(item_file, index_file)
    out = []
    for _, row in data.iterrows():
        history = ", ".join(eval(row["history_item_sid"]))
        title = sid2title.get(row["item_sid"], row["item_sid"])
        text = (f"The user has sequentially interacted with items {history}. "
                "Can you recommend the next item for him? Tell me the title of the item")
        out.append(sft_row(enc, ALPACA + "Can you recommend the next item for the user based on their interaction "
                           "history?\n\n", user_input(text), title + "\n", max_len))
    return out


def sft_data(train_file, enc, max_len, sample, seed, category):
    """SFTData: a random instruction of eleven per row."""
    data = _read(train_file, sample, seed)
    c = category
    instructs = [
        f"Given a list of {c} the user recetenly enjoy, please write a new {c} that the user may bought",
        f"Considering the {c} that has recently captured the user's interest, kindly create a compilation of "
        f"other {c} that the user might have played prior to this.",
        f"Based on the user's current gaming preference, please draft a list of potential {c} they may have "
        "experienced beforehand.",
        f"Reflecting on the {c} the user has taken pleasure in recently, we request that you formulate a list of "
        f"{c} that may have preceded the user's current enjoyment.",
        "In light of the recent gaming enjoyment expressed by the user, please assemble a list of "
        f"{c} that could potentially include past titles the user has engaged with.",
        f"Taking into account the {c} that has lately provided enjoyment to the user, please put together an "
        f"inventory of {c} the user might have explored previously.",
        f"Given the user's newfound enjoyment of a particular {c}, would you kindly generate a roster of other {c} "
        "that might resonate with their past gaming experiences?",
        f"In response to the user's recent fondness for a specific {c}, we seek your assistance in listing possible "
        f"{c} the user may have delighted in earlier.",
        f"With respect to the {c} currently enjoyed by the user, please compile a suggestive list of {c} they may "
        "have played in the past.",
        f"Bearing in mind the {c} that the user has recently been enthralled by, please construct a catalog of "
        f"other {c} that the user potentially partook in beforehand.",
        f"In relation to the user's recent entertainment with a given {c}, it would be appreciated if you could "
        f"curate a list of {c} that might form part of the user's previous gaming history.",
    ]
    out = []
    for i in range(len(data)):
        instruction = ALPACA + instructs[random.randint(0, len(instructs) - 1)] + "\n \n"
        row = data.iloc[i]
        titles = eval(row["history_item_title"])
        history = ""
        for k, title in enumerate(titles):
            history += ("" if k == 0 else ",\t") + '"' + title + '"'
        text = f"The user has palyed the following {category}s before: {history}"
        out.append(sft_row(enc, instruction, user_input(text), '"' + str(row["item_title"]) + '"\n', max_len))
    return out


def title_history2sid(train_file, index_file, enc, max_len, sample, seed, category):
    """TitleHistory2SidSFTDataset (it also loads item_file, unused)."""
    data = _read(train_file, sample, seed)
    id2sid = {item_id: _sid(sids) for item_id, sids in _json(index_file).items() if len(sids) >= 3}
    out = []
    for _, row in data.iterrows():
        titles = ", ".join(f'"{t}"' for t in eval(row["history_item_title"]))
        target = id2sid.get(str(row["item_id"]), str(row["item_id"]))
        text = (f"The user has interacted with the following {category} items in chronological order: {titles}. "
                "Can you predict the next item the user may expect?")
        out.append(sft_row(enc, ALPACA + "Based on the user's historical interaction with item titles, predict the "
                           "semantic ID of the next item they may expect.\n\n", user_input(text), target + "\n",
                           max_len))
    return out


# ---- rl.py's three datasets: rows of {"prompt", "completion"}, and the reward's lookup dicts ----

class RlSet:
    def __init__(self):
        self.rows, self.prompt2history, self.history2target = [], {}, {}

    def add(self, prompt: str, history: str, target: str) -> None:
        self.prompt2history[prompt] = history
        self.history2target[history] = target
        self.rows.append({"prompt": prompt, "completion": target})


def sid_dataset(train_file, sample=-1, seed=0):
    """SidDataset."""
    out = RlSet()
    for _, row in _read(train_file, sample, seed).iterrows():
        sids = eval(row["history_item_sid"])
        text = (f"The user has interacted with items {', '.join(sids)} in chronological order. "
                "Can you predict the next possible item that the user may expect?")
        out.add(user_input(text), "::".join(sids), str(row["item_sid"]) + "\n")
    return out


def rl_title2sid(item_file, index_file, sample=-1, seed=0):
    """RLTitle2SidDataset: title2sid, then description2sid."""
    random.seed(seed)
    items, index = _json(item_file), _json(index_file)
    title2sid, description2sid = {}, {}
    for item_id, sids in index.items():
        if item_id in items:
            title, description = items[item_id]["title"], items[item_id]["description"]
            if isinstance(description, str) and description.startswith("['") and description.endswith("']"):
                try:
                    parsed = eval(description)
                    description = parsed[0] if parsed else description
                except Exception:  # noqa: BLE001 - upstream's bare except
                    pass
            if len(sids) >= 3:
                title2sid[title] = _sid(sids)
                description2sid[description] = _sid(sids)
    data = [("title2sid", t, s) for t, s in title2sid.items()] + \
        [("description2sid", d, s) for d, s in description2sid.items()]
    if 0 < sample < len(data):
        data = random.sample(data, sample)
    out = RlSet()
    for task, given, sid in data:
        text = f"Which item has the title: {given}?" if task == "title2sid" else \
            f'An item can be described as follows: "{given}". Which item is it describing?'
        out.add(user_input(text), given, sid + "\n")
    return out


def rl_seq_title2sid(train_file, sample=-1, seed=0):
    """RLSeqTitle2SidDataset."""
    out = RlSet()
    for _, row in _read(train_file, sample, seed).iterrows():
        titles = eval(row["history_item_title"])
        inter_titles = ", ".join([f'"{title}"' for title in titles])
        text = (f"Given the title sequence of user historical interactive items: {inter_titles}, "
                "can you recommend a suitable next item for the user?")
        out.add(user_input(text), "::".join(titles), row["item_sid"] + "\n")
    return out
