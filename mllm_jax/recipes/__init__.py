"""Recipes by name. Each recipe module defines `Config` (its typed config) and
`build(cfg, mesh)`: checks the input (data, batch sizes against the mesh) and returns a function
that makes its trainer Task; modules are imported only when their recipe runs."""

RECIPES = {"nanogpt": "mllm_jax.recipes.nanogpt", "sft": "mllm_jax.recipes.sft", "rl": "mllm_jax.recipes.rl"}
