"""Packaging: `pip install .` installs one top-level package, `qwen_jax`, which works without the checkout.

`tools/` and `configs/` are the source checkout's front ends and example launch configs; the
package must neither ship them nor import them.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = ("tools", "configs")  # folders of the checkout that the package must not depend on


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_package_discovery_finds_qwen_jax_only():
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(where=str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert {p.split(".")[0] for p in packages} == {"qwen_jax"}
    assert {"qwen_jax", "qwen_jax.hf", "qwen_jax.data", "qwen_jax.trainer"} <= set(packages)


def _outside_imports(source: str, filename: str) -> list[str]:
    """`import tools...` / `from configs... import` statements (absolute imports of OUTSIDE) in one module."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found += [f"{filename}:{node.lineno}: {m}" for m in modules if m.split(".")[0] in OUTSIDE]
    return found


def test_qwen_jax_imports_nothing_from_tools_or_configs():
    # the check itself sees every form (also inside functions)
    sample = "import tools.convert\ndef f():\n    from configs.base import get_config\n    import os, configs\n"
    assert len(_outside_imports(sample, "sample.py")) == 3
    assert _outside_imports("from qwen_jax.hf import convert\nfrom . import tools\n", "ok.py") == []
    modules = sorted((REPO / "qwen_jax").rglob("*.py"))
    assert len(modules) > 30
    found = [hit for path in modules for hit in _outside_imports(path.read_text(encoding="utf-8"), str(path))]
    assert found == []


def test_wheel_ships_qwen_jax_only_and_runs_without_the_checkout(tmp_path):
    """Build the wheel from a copy of the checkout (tools/ and configs/ included), then import the
    package from the unpacked wheel alone, with `tools` and `configs` made unimportable."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".*")
    for name in ("qwen_jax", *OUTSIDE):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = list((tmp_path / "dist").glob("qwen_jax-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"qwen_jax"}
    for shipped in ("qwen_jax/presets.py", "qwen_jax/hf/convert.py", "qwen_jax/hf/export.py",
                    "qwen_jax/data/bundled/chat.jsonl"):
        assert shipped in names
    assert "qwen-convert = qwen_jax.hf.convert:main" in entry_points

    program = (
        "import sys\n"
        "sys.modules.update(tools=None, configs=None)\n"  # any import of them raises ImportError
        "import qwen_jax, qwen_jax.hf.convert, qwen_jax.hf.export, qwen_jax.presets, qwen_jax.run_config\n"
        "import qwen_jax.train, qwen_jax.lora, qwen_jax.cli\n"
        "assert qwen_jax.presets.get_preset('tiny')['model_type']\n"
        "print(qwen_jax.__file__)\n"
        "sys.exit(qwen_jax.hf.convert.main(['hf-to-orbax', '--help']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str(tmp_path / "site" / "qwen_jax" / "__init__.py")
    assert "--hf_dir" in proc.stdout
