"""Recipes by name. Each recipe module defines `Config` (its typed config) and
`build(cfg, mesh)` (its trainer Task); modules are imported only when their recipe runs."""

RECIPES = {"nanogpt": "mllm_jax.recipes.nanogpt"}
