"""`python tools/convert.py ...` (or `python -m tools.convert ...`): the `qwen-convert` command of a source checkout.

The conversion lives in `qwen_jax.hf.convert`; see docs/convert.md.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's qwen_jax
    from qwen_jax.hf.convert import main

    sys.exit(main())
