"""The package's import structure, read statically with `ast` (nothing is imported or executed).

Module-level and function-level imports both count: a lazy import inside a function is still a
dependency, and a cycle hidden in one breaks as soon as someone moves the import to the top.

* no cycle between qwen_jax modules (the failure names the cycle);
* no private name (`_name`) of one qwen_jax module imported or used by another: what is shared is
  public in the module that owns it;
* third-party private API (`._src` packages, `from pkg import _name`, `pkg._name`) only in
  `qwen_jax/compat.py`, the one place that documents why and on which versions it was checked.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "qwen_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
COMPAT = f"{PACKAGE}.compat"
# Public, documented APIs whose names happen to start with an underscore.
DOCUMENTED = {"os._exit"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), filename=str(p)) for p in sorted(ROOT.rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(module: str, node: ast.ImportFrom, modules) -> str:
    """The absolute module a (possibly relative) `from ... import` names."""
    if not node.level:
        return node.module or ""
    package = module if module in modules and (ROOT / "/".join(module.split(".")[1:]) / "__init__.py").exists() \
        else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports(module: str, tree: ast.Module, modules):
    """(target module, imported name or None, local alias or None, node) for every import in the file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, a.asname, node
        elif isinstance(node, ast.ImportFrom):
            base = absolute(module, node, modules)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:  # `from pkg import submodule`
                    yield sub, None, a.asname or a.name, node
                else:
                    yield base, a.name, a.asname or a.name, node


def import_graph(modules) -> dict[str, set[str]]:
    graph = {m: set() for m in modules}
    for module, tree in modules.items():
        for target, _, _, _ in imports(module, tree, modules):
            if target in modules and target != module:
                graph[module].add(target)
    return graph


def find_cycle(graph) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def module_aliases(module, tree, modules, *, own: bool):
    """Local names bound to a module by an import: qwen_jax modules (own=True) or third-party ones."""
    out = {}
    for target, name, alias, _ in imports(module, tree, modules):
        if name is None and alias is not None and (target.startswith(PACKAGE) == own):
            out[alias] = target
        elif name is None and alias is None and not own and not target.startswith(PACKAGE):
            out[target.split(".")[0]] = target.split(".")[0]  # `import jax.numpy` binds `jax`
    return out


def private_uses(modules):
    """`from qwen_jax.x import _name` and `x._name` across qwen_jax modules."""
    found = []
    for module, tree in modules.items():
        for target, name, _, node in imports(module, tree, modules):
            if target in modules and target != module and (is_private(name or "") or is_private(target.split(".")[-1])):
                found.append(f"{module}:{node.lineno} imports {target}.{name or ''}".rstrip("."))
        aliases = module_aliases(module, tree, modules, own=True)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and is_private(node.attr) \
                    and aliases.get(node.value.id, module) != module:
                found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def third_party_private_uses(modules):
    """Imports of `_src`/private third-party modules or names, and `pkg._name` attribute use."""
    found = []
    for module, tree in modules.items():
        for target, name, _, node in imports(module, tree, modules):
            if target.startswith(PACKAGE):
                continue
            if any(is_private(part) for part in target.split(".")) or is_private(name or ""):
                found.append(f"{module}:{node.lineno} imports {target} {name or ''}".rstrip())
        aliases = module_aliases(module, tree, modules, own=False)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and is_private(node.attr) \
                    and node.value.id in aliases and f"{aliases[node.value.id]}.{node.attr}" not in DOCUMENTED:
                found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def test_package_is_parsed():
    modules = package_modules()
    assert COMPAT in modules and f"{PACKAGE}.attention.registry" in modules and len(modules) > 30


def test_no_import_cycle():
    cycle = find_cycle(import_graph(package_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_cross_module_names():
    found = private_uses(package_modules())
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_third_party_private_api_only_in_compat():
    modules = package_modules()
    found = [f for f in third_party_private_uses(modules) if not f.startswith(f"{COMPAT}:")]
    assert not found, "third-party private API outside compat.py:\n" + "\n".join(found)
    outside = [m for m, tree in modules.items() if m != COMPAT and "_src" in ast.unparse(tree)]
    assert not outside, f"`_src` outside compat.py: {outside}"
    assert "_src" in ast.unparse(modules[COMPAT]), "compat.py is where the private uses live"


def test_checker_sees_what_it_must():
    """The checks themselves: a planted cycle, a private import, a private attribute, a `_src` import."""
    src = {
        f"{PACKAGE}.a": "from qwen_jax.b import _helper\n",
        f"{PACKAGE}.b": "def f():\n    from qwen_jax import a\n    return a._x\n",
        f"{PACKAGE}.c": "def g():\n    from jax._src.cudnn import fused_attention_stablehlo\n    import jax\n"
                        "    return jax._src\n",
    }
    modules = {m: ast.parse(s) for m, s in src.items()}
    assert find_cycle(import_graph(modules)) in ([f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"],)
    assert private_uses(modules) == [f"{PACKAGE}.a:1 imports {PACKAGE}.b._helper", f"{PACKAGE}.b:3 uses {PACKAGE}.a._x"]
    assert third_party_private_uses(modules) == [f"{PACKAGE}.c:2 imports jax._src.cudnn fused_attention_stablehlo",
                                                 f"{PACKAGE}.c:4 uses jax._src"]
