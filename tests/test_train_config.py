"""Launcher config errors: unknown keys, wrong types, freeze patterns that match nothing, seq without ring."""

from __future__ import annotations

import pytest

from configs.base import get_config
from qwen_jax import train
from qwen_jax.trainer.optimizer import FreezeError
from tests import train_launch as tl


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(train.ConfigKeyError) as e:
        train.check_overrides(["prog", "--config=configs/base.py", "--config.total_stepz=3"])
    msg = str(e.value)
    assert "'total_stepz'" in msg and "total_steps" in msg and "save_every" in msg and "optimizer.learning_rate" in msg
    with pytest.raises(train.ConfigKeyError, match="'optimizer.lr'"):
        train.check_overrides(["prog", "--config.optimizer.lr=1e-3"])


@pytest.mark.parametrize("arg, key, kind", [("--config.total_steps=abc", "total_steps", "int"),
                                            ("--config.total_steps=2.5", "total_steps", "int"),
                                            ("--config.optimizer.learning_rate=fast", "optimizer.learning_rate",
                                             "float"),
                                            ("--config.synthetic_data=maybe", "synthetic_data", "bool")])
def test_wrong_type_names_key_and_type(arg, key, kind):
    with pytest.raises(train.ConfigKeyError, match=f"'{key}' expects {kind}"):
        train.check_overrides(["prog", arg])


def test_valid_overrides_pass():
    train.check_overrides(["prog", "--config", "configs/base.py", "--config.total_steps=3", "--config.freeze=mlp",
                           "--config.optimizer.learning_rate=1e-4", "--noconfig.synthetic_data"])


def test_cli_error_exit_code(tmp_path):
    result = tl.run(tmp_path, "--config.save_evry=3")
    assert result.returncode == 2
    assert "unknown config key 'save_evry'" in result.stderr and "save_every" in result.stderr


def _config(**kw):
    c = get_config()
    c.synthetic_data = True
    c.model.overrides = "vocab_size=512"
    for k, v in kw.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return c


@pytest.mark.parametrize("key, value, error, match", [
    ("freeze", "layers/mlp/gate_projj", FreezeError, "matches no parameter"),
    ("freeze_layers", 5, FreezeError, "exceeds the model's 2 layers"),
    ("mesh.seq", 2, train.ConfigKeyError, "ring attention"),
    ("model.overrides", "vocab_sise=3", train.ConfigKeyError, "vocab_sise"),
    ("grad_accum_steps", 3, train.ConfigKeyError, "grad_accum_steps"),
])
def test_launch_refuses_misconfiguration(tmp_path, key, value, error, match):
    config = _config(**{key: value, "mesh.fsdp": -1 if key != "mesh.seq" else 4})
    with pytest.raises(error, match=match):
        train.run(config, str(tmp_path))
