"""Launcher command line: unknown keys, wrong types, list keys from JSON; misconfigurations refused by `train.run`."""

from __future__ import annotations

import pytest

from configs.base import get_config
from qwen_jax import run_config, train
from qwen_jax.trainer.optimizer import FreezeError
from tests import train_launch as tl


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(run_config.RunConfigError) as e:
        run_config.check_overrides(["prog", "--config=configs/base.py", "--config.total_stepz=3"])
    msg = str(e.value)
    assert "'total_stepz'" in msg and "total_steps" in msg and "save_every" in msg and "optimizer.learning_rate" in msg
    with pytest.raises(run_config.RunConfigError, match="'optimizer.lr'"):
        run_config.check_overrides(["prog", "--config.optimizer.lr=1e-3"])


@pytest.mark.parametrize("arg, key, kind", [("--config.total_steps=abc", "total_steps", "int"),
                                            ("--config.total_steps=2.5", "total_steps", "int"),
                                            ("--config.optimizer.learning_rate=fast", "optimizer.learning_rate",
                                             "float"),
                                            ("--config.synthetic_data=maybe", "synthetic_data", "bool"),
                                            ("--config.data.sources={'path': 1}", "data.sources", "a JSON list"),
                                            ('--config.data.sources={"path": "a.jsonl"}', "data.sources",
                                             "a JSON list")])
def test_wrong_type_names_key_and_type(arg, key, kind):
    with pytest.raises(run_config.RunConfigError, match=f"'{key}' expects {kind}"):
        run_config.check_overrides(["prog", arg])


def test_valid_overrides_pass():
    assert run_config.check_overrides(["prog", "--config", "configs/base.py", "--config.total_steps=3",
                                       "--config.freeze=mlp", "--config.optimizer.learning_rate=1e-4",
                                       "--noconfig.synthetic_data"]) == {}


def test_list_key_from_json_is_taken_off_for_absl_and_applied():
    sources = '[{"path": "a.jsonl", "kind": "text", "weight": 2}, {"path": "bundled:chat.jsonl"}]'
    for argv in (["prog", "--config.total_steps=3", f"--config.data.sources={sources}", "--workdir=w"],
                 ["prog", "--config.total_steps=3", "--config.data.sources", sources, "--workdir=w"]):
        lists = run_config.check_overrides(argv)
        assert lists == {"data.sources": [{"path": "a.jsonl", "kind": "text", "weight": 2},
                                          {"path": "bundled:chat.jsonl"}]}
        # absl sees the config file named first (its default) and no JSON argument
        assert run_config.absl_argv(argv, lists) == ["prog", "--config=configs/base.py", "--config.total_steps=3",
                                                     "--workdir=w"]
        config = get_config()
        config.lock()
        run_config.apply_overrides(config, lists)
        assert config.data.sources[0]["path"] == "a.jsonl" and len(config.data.sources) == 2


def test_cli_error_exit_code(tmp_path):
    result = tl.run(tmp_path / "w", "--config.save_evry=3")
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown config key 'save_evry'") and "save_every" in result.stderr
    assert not (tmp_path / "w").exists()


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
    ("mesh.seq", 2, run_config.RunConfigError, "ring attention"),
    ("model.overrides", "vocab_sise=3", run_config.RunConfigError, "vocab_sise"),
    ("grad_accum_steps", 3, run_config.RunConfigError, "grad_accum_steps"),
])
def test_launch_refuses_misconfiguration(tmp_path, key, value, error, match):
    config = _config(**{key: value, "mesh.fsdp": -1 if key != "mesh.seq" else 4})
    with pytest.raises(error, match=match):
        train.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
