"""`python -m mllm_jax train RECIPE ...`: the command the launcher runs on every worker."""

import sys

from mllm_jax.train import main

sys.exit(main())
