"""`python -m mllm_jax train RECIPE ...`: the command the launcher runs on every worker."""

import signal
import sys

from mllm_jax.train import main

code = main()
for sig in (signal.SIGTERM, signal.SIGINT):  # the run is over: a late stop request must not turn
    signal.signal(sig, signal.SIG_IGN)       # a clean exit into a traceback during interpreter exit
sys.exit(code)
