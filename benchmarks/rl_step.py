"""RL (GRPO) step on CPU: our recipe's step vs TRL's GRPOTrainer with MiniOneRec's constrained beam-search
rollout, on the same small Qwen2 and the same prompts, measured side by side in one run.

    python benchmarks/rl_step.py [--prompts 8] [--rounds 5]

The model is beam_search.py's (a random Qwen2, hidden 256, 4 layers, with the SID tokens of the shared
Industrial index, random rows), fp32; both sides load the same Hugging Face directory. The prompts are
MiniOneRec's RL prompts (`build_rl_prompts` on the Industrial valid CSV, configs/rl/cpu_smoke.yaml's
samples: 16 per task, 48 in all, up to 192 tokens); step s takes `--prompts` of them by the recipe's
`step_indices(seed, s)`, the same on both sides. GRPO, 16 beams per prompt, ranking reward, beta 1e-3
(so a reference forward), one update per rollout, lr 1e-3 constant, grad clip 0.3, AdamW.

- ours: `mllm_jax.recipes.rl` built on configs/rl/cpu_smoke.yaml, one micro-batch of all the step's
  prompts; a step is `RLTask.train_step` (constrained BeamSearch rollout + reference scoring, host
  rewards and advantages, the jitted update), timed whole; its perf/rollout_sec and perf/update_sec give
  the parts. The beam search alone is timed once more on the step's prompts after the step.
- PyTorch: TRL 1.16 GRPOTrainer (loss_type grpo, beta 1e-3, num_generations 16, no gradient
  checkpointing, no KL bias correction, its fused AdamW) on the same directory, with a reference model.
  As MiniOneRec's trainer: the rollout is `model.generate(num_beams=16, num_return_sequences=16,
  length_penalty=0, max_new_tokens=128)` with [TemperatureLogitsWarper(1.0), its ConstrainedLogitsProcessor]
  (beam_search.py's port) on the step's prompts (the recipe's token ids, left-padded), then the reference
  per-token log-probs (TRL's `_get_per_token_logps_and_entropies` on the reference model); the ranking
  reward of mllm_jax.rl.rewards
  on the decoded completions, group-normalized advantages; the update is `trainer._compute_loss`, backward,
  clip_grad_norm_(0.3) and the optimizer step.

"rollout" is generation + reference log-probs on both sides (ours' perf/rollout_sec), "update" the loss,
backward and optimizer step, "total" the whole step. Each side lives in its own process, kept warm; the
parent asks them for one step each per round, alternating which goes first, so only one computes at a
time. Round 0 (step 0) is the warm-up (ours compiles there) and is not in the medians; its beams, from the
same weights, are compared SID by SID. Needs torch, transformers and trl (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from beam_search import AMAZON, INDEX, MODEL, REPO, _env, constrained_processor, prepare

G = 16
MARK = "@@rl_step "


def load_cfg(model_dir: str, prompts: int):  # type: ignore[no-untyped-def]
    from mllm_jax.config import load_config
    from mllm_jax.recipes import rl

    csv = AMAZON / "valid" / "Industrial_and_Scientific_5_2016-10-2018-11.csv"
    return load_config(rl.Config, REPO / "configs" / "rl" / "cpu_smoke.yaml", [
        f"base_model={model_dir}", "export_hf=false", f"data.train_file={csv}", f"data.sid_index_path={INDEX}",
        f"data.item_meta_path={AMAZON / 'index' / 'Industrial_and_Scientific.item.json'}", "data.test_file=''",
        f"rl.num_generations={G}", f"train.prompts_per_step={prompts}", f"train.per_device_prompts={prompts}",
        "train.warmup_steps=0", "train.warmup_ratio=0", "train.max_steps=1000"])


class Ours:
    def __init__(self, model_dir: str, prompts: int):
        from mllm_jax import runtime
        from mllm_jax.recipes import rl

        runtime.tune_host_allocator()
        cfg = load_cfg(model_dir, prompts)
        self.task = rl.build(cfg, runtime.make_mesh(cfg.jax.mesh_shape))()
        self.state = self.task.state
        assert self.task.programs.accum == 1

    def beams(self, step: int) -> tuple[list[list[str]], float]:
        """The rollout alone (the beam search) on step's prompts: SID strings and seconds."""
        import jax

        from mllm_jax import runtime
        from mllm_jax.eval.beam_search import left_pad

        task, prep = self.task, self.task.prep
        idx = runtime.step_indices(len(prep.prompts), task.cfg.train.prompts_per_step, task.cfg.seed, step)
        ids, mask = left_pad([prep.prompt_ids[i] for i in idx], task.seq, prep.opened.eos_id)
        ids, mask = task._global(ids, False), task._global(mask, False)
        t = time.perf_counter()
        sids, _ = task.programs.rollout(self.state["params"], ids, mask, jax.random.key(0))
        sids = runtime.to_host(sids)
        return prep.trie.decode_beams(sids), time.perf_counter() - t

    def step(self, step: int) -> dict:
        out = {"first_beams": self.beams(step)[0]} if step == 0 else {}
        t = time.perf_counter()
        self.state, m = self.task.train_step(self.state, step)  # returns host floats: the step is done
        total = time.perf_counter() - t
        return {**out, "total": total, "rollout": m["perf/rollout_sec"], "update": m["perf/update_sec"],
                "beam_search": self.beams(step)[1], "reward": m["rl/reward_mean"], "loss": m["loss"]}


class Trl:
    def __init__(self, model_dir: str, prompts: int):
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TemperatureLogitsWarper
        from trl import GRPOConfig, GRPOTrainer

        from mllm_jax.data import sid, sid_rl
        from mllm_jax.models import hf
        from mllm_jax.rl import rewards

        cfg = load_cfg(model_dir, prompts)
        self.cfg, self.n = cfg, prompts
        self.prompts = sid_rl.build_rl_prompts(cfg.data, cfg.tasks, cfg.seed)  # as rl.prepare builds them
        # The recipe's token ids (the last max_prompt_len tokens, as MiniOneRec truncates): transformers 5 loads
        # this tokenizer as Qwen2Tokenizer, whose pre-tokenizer splits digit runs where tokenizer.json does not.
        self.ids = sid_rl.tokenize_prompts(self.prompts, hf.load_tokenizer(model_dir), cfg.data.max_prompt_len)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        args = GRPOConfig(output_dir=str(Path(model_dir).parent / "trl"), per_device_train_batch_size=prompts * G,
                          num_generations=G, max_completion_length=128, temperature=1.0, beta=cfg.rl.beta,
                          loss_type="grpo", use_bias_correction_kl=False, learning_rate=cfg.train.learning_rate,
                          max_grad_norm=cfg.train.grad_clip, gradient_checkpointing=False, bf16=False, use_cpu=True,
                          report_to="none", seed=0)

        def ranking(prompts, completions, target, **_):  # noqa: ANN001, ANN202 (TRL's reward signature)
            groups = [completions[i:i + G] for i in range(0, len(completions), G)]
            return rewards.ranking(groups, target[::G]).ravel().tolist()

        self.trainer = GRPOTrainer(model=model, reward_funcs=ranking, args=args, processing_class=tok,
                                   train_dataset=datasets.Dataset.from_dict(
                                       {"prompt": [p.prompt for p in self.prompts],
                                        "target": [p.target for p in self.prompts]}))
        self.trainer.current_gradient_accumulation_steps = 1
        self.model, self.tok, self.reward = self.trainer.model, tok, ranking
        self.model.train()
        assert not getattr(self.model, "is_gradient_checkpointing", False)
        self.opt = self.trainer.create_optimizer()
        index = sid.load_index(str(INDEX))
        self.processor = constrained_processor(tok, index, tok.eos_token_id)
        self.warper = TemperatureLogitsWarper(1.0)
        self.gen = GenerationConfig(max_new_tokens=128, length_penalty=0.0, num_beams=G, num_return_sequences=G,
                                    do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                    top_k=None, top_p=None)
        self.id_to_token = {tok.convert_tokens_to_ids(t): t for tokens in index.values() for t in tokens}

    def step(self, step: int) -> dict:
        import torch

        from mllm_jax import runtime

        trainer, tok, model = self.trainer, self.tok, self.model
        t0 = time.perf_counter()
        idx = runtime.step_indices(len(self.prompts), self.n, self.cfg.seed, step)
        batch, ids = [self.prompts[i] for i in idx], [self.ids[i].tolist() for i in idx]
        L = max(map(len, ids))  # left-padded to the batch's longest, as MiniOneRec's tokenizer call pads
        prompt_ids = torch.tensor([[tok.pad_token_id] * (L - len(x)) + x for x in ids])
        prompt_mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids])

        t1 = time.perf_counter()
        with torch.no_grad():  # MiniOneRec: one beam search per (de-duplicated) prompt, G beams
            seqs = model.generate(prompt_ids, attention_mask=prompt_mask, generation_config=self.gen,
                                  logits_processor=[self.warper, self.processor()])
        t2 = time.perf_counter()
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
        completion_ids = seqs[:, L:]
        is_eos = completion_ids == tok.eos_token_id
        eos_at = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.tensor(is_eos.shape[1]))
        completion_mask = (torch.arange(is_eos.shape[1])[None] <= eos_at[:, None]).int()
        with torch.no_grad():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.ref_model, torch.cat([prompt_ids, completion_ids], 1),
                torch.cat([prompt_mask, completion_mask], 1), completion_ids.shape[1], batch_size=len(seqs))
        t3 = time.perf_counter()

        texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
        reward = torch.tensor(self.reward(None, texts, [p.target for p in batch for _ in range(G)]))
        grouped = reward.view(-1, G)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                  "completion_mask": completion_mask, "advantages": advantages, "ref_per_token_logps": ref}

        t4 = time.perf_counter()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        out = {"total": t5 - t0, "rollout": t3 - t1, "update": t5 - t4, "beam_search": t2 - t1,
               "reward": float(reward.mean()), "loss": loss.item(), "threads": torch.get_num_threads()}
        if step == 0:
            sids = ["".join(self.id_to_token.get(t, "") for t in row.tolist()) for row in completion_ids]
            out["first_beams"] = [sids[i:i + G] for i in range(0, len(sids), G)]
        return out


def serve(side: str, model_dir: str, prompts: int) -> None:
    """A warm worker: reads step numbers on stdin, answers one JSON line per step."""
    t = time.perf_counter()
    worker = (Ours if side == "jax" else Trl)(model_dir, prompts)
    print(MARK + json.dumps({"setup": time.perf_counter() - t}), flush=True)
    for line in sys.stdin:
        print(MARK + json.dumps(worker.step(int(line))), flush=True)


class Child:
    def __init__(self, side: str, model_dir: str, prompts: int, log_dir: str):
        self.side, self.log = side, Path(log_dir) / f"{side}.log"
        self.proc = subprocess.Popen([sys.executable, __file__, "--side", side, "--model-dir", model_dir,
                                      "--prompts", str(prompts)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log.open("w"), text=True, env={"JAX_PLATFORMS": "cpu", **_env()})
        self.setup = self.read()["setup"]

    def read(self) -> dict:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        sys.exit(f"{self.side} side failed:\n{self.log.read_text()[-3000:]}")

    def step(self, step: int) -> dict:
        self.proc.stdin.write(f"{step}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.read()

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (x 16 beams)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one step per side each), after a warm-up")
    parser.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        serve(args.side, args.model_dir, args.prompts)
        return

    sides = ("torch", "jax")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = prepare(Path(tmp))
        children = {s: Child(s, model_dir, args.prompts, tmp) for s in sides}  # one after the other
        results: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(args.rounds + 1):
            for s in sides if r % 2 == 0 else sides[::-1]:
                results[s].append(children[s].step(r))
            print(f"round {r}{' (warm-up)' if r == 0 else ''}: " + "  ".join(
                f"{s} {results[s][-1]['total']:6.2f} s (rollout {results[s][-1]['rollout']:.2f}, update "
                f"{results[s][-1]['update']:.2f})" for s in sides), flush=True)
        for c in children.values():
            c.close()

    n = args.prompts
    timed = {s: v[1:] for s, v in results.items()}
    med = {s: {k: statistics.median(x[k] for x in v) / n for k in ("rollout", "beam_search", "update", "total")}
           for s, v in timed.items()}
    t, j = results["torch"], results["jax"]
    print(f"\nQwen2 {MODEL}, fp32, CPU; {n} MiniOneRec RL prompts per step x {G} beams, GRPO, "
          f"ranking reward, beta 1e-3; median of {args.rounds} rounds (steps 1-{args.rounds}) after a warm-up step")
    print(f"{'s/prompt':10s}{'rollout':>10s}{' (beams)':>10s}{'update':>10s}{'total':>10s}")
    for s in sides:
        m = med[s]
        print(f"{s:10s}{m['rollout']:10.3f}{m['beam_search']:10.3f}{m['update']:10.3f}{m['total']:10.3f}")
    ratio = {k: med["torch"][k] / med["jax"][k] for k in ("rollout", "beam_search", "update", "total")}
    print(f"{'torch/jax':10s}{ratio['rollout']:9.2f}x{ratio['beam_search']:9.2f}x{ratio['update']:9.2f}x"
          f"{ratio['total']:9.2f}x")
    print(f"goal total >= 3x: {'met' if ratio['total'] >= 3 else 'NOT met'} ({ratio['total']:.2f}x)")
    print(f"warm-up step: torch {t[0]['total']:.1f} s, jax {j[0]['total']:.1f} s (compilation); setup torch "
          f"{children['torch'].setup:.1f} s, jax {children['jax'].setup:.1f} s; torch threads {t[0]['threads']}")
    same = sum(a == b for ra, rb in zip(j[0]["first_beams"], t[0]["first_beams"]) for a, b in zip(ra, rb))
    sets = sum(len(set(ra) & set(rb)) for ra, rb in zip(j[0]["first_beams"], t[0]["first_beams"]))
    total = sum(len(r) for r in t[0]["first_beams"])
    print(f"step 0 beams (same weights): {same}/{total} identical at the same rank, {sets}/{total} in both "
          f"groups; mean reward step 0: torch {t[0]['reward']:.4f} jax {j[0]['reward']:.4f}")


if __name__ == "__main__":
    main()
