"""The trie of an index's semantic IDs, as dense tables a jitted beam search can gather from.

MiniOneRec constrains generation with a hash of every `tokenizer("### Response:\\n{sid}\\n") + [eos]`
prefix (evaluate.py + LogitProcessor.py): after the prompt, only the first SID tokens are allowed, after
each SID prefix only the tokens that extend it to a real item, after a whole SID only the "\\n" tokens,
then EOS. Since the SID tokens are added tokens, each is one token id and the text splits around them,
so that hash is exactly this trie (its root standing for the "### Response:\\n" key) followed by the
fixed `suffix` = encode("\\n") + [eos].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mllm_jax.config import ConfigError


@dataclass
class SidTrie:
    depth: int
    """SID tokens per item (the same for every item of the index)."""
    next_tokens: np.ndarray
    """(nodes, C) int32: token ids of each node's children, ascending, -1 = none. Node 0 is the root;
    nodes are numbered level by level, so level d is a contiguous range; leaves (whole SIDs) have none."""
    next_node: np.ndarray
    """(nodes, C) int32: the child node of each entry of next_tokens (-1 = none)."""
    suffix: np.ndarray
    """int32 tokens forced after a whole SID: tokenizer.encode("\\n") ids + [eos]."""
    valid: set[str] = field(default_factory=set)
    """Every SID string of the index, e.g. "<a_1><b_2><c_3>"."""
    id_to_token: dict[int, str] = field(default_factory=dict)
    """SID token id -> its text."""

    @property
    def num_nodes(self) -> int:
        return int(self.next_tokens.shape[0])

    def decode(self, tokens) -> str:
        """SID token ids (depth of them) -> the SID string "<a_1><b_2><c_3>"; "" if any id is -1
        (a beam that found no valid item, see BeamSearch)."""
        ids = [int(t) for t in np.asarray(tokens).reshape(-1)]
        if any(t < 0 for t in ids):
            return ""
        return "".join(self.id_to_token[t] for t in ids)

    def decode_beams(self, tokens) -> list[list[str]]:
        """(B, K, depth) SID token ids -> B lists of K SID strings."""
        tokens = np.asarray(tokens)
        return [[self.decode(beam) for beam in row] for row in tokens]


def build_trie(index: dict[str, list[str]], tokenizer, eos_id: int) -> SidTrie:
    """The trie of `index` (item id -> SID tokens, as mllm_jax.data.sid.load_index reads it).

    `tokenizer` is a `tokenizers.Tokenizer` to which the SID tokens were added (hf.add_tokens): each
    must be a single token of it, or ConfigError names the first that is not. Every item must have the
    same number of SID tokens (any number), else ConfigError. Items sharing a SID are one leaf.
    """
    if not index:
        raise ConfigError("SID index is empty: no items to build the SID trie from")
    items = list(index.items())
    first_id, first = items[0]
    depth = len(first)
    for item_id, tokens in items:
        if len(tokens) != depth:
            raise ConfigError(f"SID index: item {item_id!r} has {len(tokens)} SID tokens, item {first_id!r} has "
                              f"{depth}; every SID must have the same length")

    names = sorted({t for _, tokens in items for t in tokens})
    encoded = tokenizer.encode_batch(names, add_special_tokens=False)
    token_id: dict[str, int] = {}
    for name, enc in zip(names, encoded):
        tid = tokenizer.token_to_id(name)
        if tid is None or list(enc.ids) != [tid]:
            raise ConfigError(f"SID token {name!r} is not a single token of the tokenizer (it encodes to "
                              f"{len(enc.ids)} tokens); add the index's SID tokens to the tokenizer first")
        token_id[name] = tid
    if eos_id in token_id.values():
        raise ConfigError(f"SID index: the EOS token id {eos_id} is also a SID token")

    # Level-by-level (BFS) numbering: the children of each node sorted by token id.
    paths = sorted({tuple(token_id[t] for t in tokens) for _, tokens in items})
    level_prefixes: list[list[tuple[int, ...]]] = [[()]]
    for d in range(1, depth + 1):
        level_prefixes.append(sorted({p[:d] for p in paths}))
    node_of: dict[tuple[int, ...], int] = {}
    for prefixes in level_prefixes:
        for p in prefixes:
            node_of[p] = len(node_of)
    children: dict[int, list[tuple[int, int]]] = {}
    for prefixes in level_prefixes[1:]:
        for p in prefixes:
            children.setdefault(node_of[p[:-1]], []).append((p[-1], node_of[p]))
    width = max(len(c) for c in children.values())
    next_tokens = np.full((len(node_of), width), -1, np.int32)
    next_node = np.full((len(node_of), width), -1, np.int32)
    for node, kids in children.items():
        kids.sort()
        next_tokens[node, :len(kids)] = [t for t, _ in kids]
        next_node[node, :len(kids)] = [n for _, n in kids]

    newline = tokenizer.encode("\n", add_special_tokens=False).ids
    suffix = np.asarray([*newline, eos_id], np.int32)
    return SidTrie(depth=depth, next_tokens=next_tokens, next_node=next_node, suffix=suffix,
                   valid={"".join(tokens) for _, tokens in items},
                   id_to_token={i: name for name, i in token_id.items()})
