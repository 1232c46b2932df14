"""What RL adds to the trainer, as small pure modules: rollouts (rollout.py), per-token
log-probs of completions (logprobs.py), rewards (rewards.py), advantages (advantages.py) and
the policy losses (losses.py). The `rl` recipe (recipes/rl.py) wires them into the train loop."""
