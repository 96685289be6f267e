"""`qwen_jax` imports its model code on first use (PEP 562 `__getattr__`): `import qwen_jax` loads no numerical
library (the config linter `qwen_jax.lint` relies on it), and every name the package exported when it imported
eagerly still resolves to the same object, `qwen_jax.generate` included (the function, and the callable CLI
module once `python -m qwen_jax.generate`'s module is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import qwen_jax

def heavy():
    return sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'numpy', 'torch', 'transformers'})

assert heavy() == [], heavy()
# the eager imports this package had, name by name
from qwen_jax.config import ConfigError, QwenConfig, config_from_dict, load_hf_config
from qwen_jax.generation import generate
from qwen_jax.hf.models import from_pretrained, load_model
from qwen_jax.hf.safetensors_io import CheckpointError
from qwen_jax.model import Qwen
assert sorted(qwen_jax.__all__) == sorted(["CheckpointError", "ConfigError", "Qwen", "QwenConfig", "config_from_dict",
                                           "from_pretrained", "generate", "load_model", "load_hf_config"])
for name in qwen_jax.__all__:
    assert getattr(qwen_jax, name) is globals()[name], name
    assert name in dir(qwen_jax)
assert qwen_jax.config.QwenConfig is QwenConfig and qwen_jax.model.Qwen is Qwen  # submodules stay attributes
assert not hasattr(qwen_jax, "no_such_name")

from flax import nnx
cfg = QwenConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, rope_theta=10000.0)
model = qwen_jax.Qwen(cfg, rngs=nnx.Rngs(0))
want = qwen_jax.generate(model, [[1, 2, 3], [4]], max_new_tokens=3, stop_ids=[])
import qwen_jax.generate as cli
assert qwen_jax.generate is cli and callable(cli)
got = qwen_jax.generate(model, [[1, 2, 3], [4]], max_new_tokens=3, stop_ids=[])
assert got == want and [len(row) for row in got] == [3, 3], (got, want)
print("OK", got)
"""


def test_exports_are_lazy_and_resolve():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("OK "), p.stdout + p.stderr
