"""A tiny random Qwen2 in Hugging Face format, written locally: the model of CPU smoke runs
and tests (no Hugging Face download needed). `python -m mllm_jax tiny-model OUT_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from mllm_jax.models.qwen2 import Qwen2Config

# Qwen2.5-Instruct's special tokens; "<|im_end|>" is its EOS, "<|endoftext|>" its pad.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

# Enough English to give the byte-level BPE useful merges for MiniOneRec's prompts and titles.
_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "### Instruction:", "### User Input:", "### Response:",
    "Can you predict the next possible item that the user may expect?",
    "The user has interacted with items in chronological order.",
    "Answer the question about item identification. What is the title of item? Which item has the title:",
    "Can you recommend the next item for the user based on their interaction history?",
    "The user has sequentially interacted with items. Can you recommend the next item for him? "
    "Tell me the title of the item",
    "Industrial and Scientific tools, tape, gloves, lab supplies, adhesive, safety glasses, "
    "stainless steel, plastic, pack of 10, black, white, inch, mm, set, kit, for home and office.",
]


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer like Qwen2's (any text encodes, no unknown token), trained on
    a small built-in corpus; deterministic for a given `vocab_size`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok


QWEN2_5_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                    tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768)
"""The shape values of Qwen/Qwen2.5-1.5B-Instruct's config.json, the SOP's model."""


def _write_model_files(out_dir: Path, tok: Tokenizer, **fields) -> "Qwen2Config":
    """config.json, generation_config.json and tokenizer_config.json of a Qwen2Config(**fields)."""
    import json

    from mllm_jax.models.qwen2 import Qwen2Config

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(**fields)
    eos, pad = tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings, "use_sliding_window": False,
        "bos_token_id": None, "eos_token_id": eos, "pad_token_id": pad,
    }
    if not cfg.attention_bias:  # Qwen2 always has q/k/v biases; Llama is Qwen2 without them
        config.update(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": pad}) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
         "model_max_length": cfg.max_position_embeddings}, indent=2) + "\n")
    return cfg


def write_shapes_model(out_dir: str | Path, **overrides) -> Path:
    """A model directory without weights: config.json with QWEN2_5_1_5B's values (`overrides`
    replace them, e.g. num_hidden_layers=2) and build_tokenizer()'s tokenizer.json. That is all
    preflight reads of a model, so the SOP's shapes compile here with nothing downloaded."""
    out_dir = Path(out_dir)
    tok = build_tokenizer()
    _write_model_files(out_dir, tok, **{**QWEN2_5_1_5B, **overrides})
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


def write_tiny_model(out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random Qwen2 (weights ~ N(0, 0.02), norms 1) with build_tokenizer()'s
    tokenizer to `out_dir` as a Hugging Face model directory; `overrides` replace
    Qwen2Config fields. Returns out_dir."""
    import jax
    import numpy as np

    from mllm_jax.models.hf import abstract_params, save_pretrained

    out_dir = Path(out_dir)
    tok = build_tokenizer()
    fields = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                  tie_word_embeddings=True, attention_bias=True, max_position_embeddings=1024)
    cfg = _write_model_files(out_dir, tok, **{**fields, **overrides})
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == "scale"
                         else rng.normal(0.0, 0.02, s.shape).astype(np.float32)),
        abstract_params(cfg))
    save_pretrained(out_dir, params, cfg, tok, source_dir=out_dir, dtype="float32")
    return out_dir
