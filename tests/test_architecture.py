"""The package layout holds its rules (docs/architecture.md): no import cycles between modules, counting imports
inside functions; packages stack in one order with lower layers importing nothing above them; no module over 600
lines; one copy of each shared helper."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "trl_onpolicy"

# lowest first; a module may import from its own layer's package or any package listed before it
LAYERS = [
    {"trl_onpolicy.utils", "trl_onpolicy.losses", "trl_onpolicy._moved"},
    {"trl_onpolicy.ops"},
    {"trl_onpolicy.testing", "trl_onpolicy.data"},
    {"trl_onpolicy.ddt"},
    {"trl_onpolicy.eval"},
    {"trl_onpolicy.hinted"},
    {"trl_onpolicy.trainer"},
    {"trl_onpolicy.compare"},
    {"trl_onpolicy.cli"},
]
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its body (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t.startswith("trl_onpolicy") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    g = {}
    for name, path in modules.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        # importing one's own package __init__ is not a cycle that can bite (it is executing already)
        g[name] = {t for t in imports_of(name, path, modules) if t not in ancestors}
    return g


def layer_of(name: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in layer):
            return i
    return None


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    a = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(a) == [["p.a", "p.b", "p.c"]]
    # imports_of sees an import inside a function body
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from trl_onpolicy.losses import token_loss\n")
    assert imports_of("trl_onpolicy.m", src, {"trl_onpolicy.losses": PKG / "losses.py"}) == {"trl_onpolicy.losses"}


def test_no_import_cycles():
    assert find_cycles(graph()) == []


def test_every_module_has_a_layer_and_imports_only_downwards():
    g = graph()
    unplaced = sorted(n for n in g if n != "trl_onpolicy" and layer_of(n) is None)
    assert unplaced == [], f"modules outside every layer: {unplaced}"
    upward = sorted(f"{a} -> {b}" for a, targets in g.items() if a != "trl_onpolicy" for b in targets
                    if b != "trl_onpolicy" and layer_of(b) > layer_of(a))
    assert upward == []


def test_lower_layers_import_nothing_from_the_package_top():
    g = graph()
    low = [n for n in g if layer_of(n) is not None and layer_of(n) <= 1]
    assert any(n == "trl_onpolicy.losses" for n in low)
    assert {n: sorted(g[n]) for n in low if "trl_onpolicy" in g[n]} == {}


@pytest.mark.parametrize("name", sorted(all_modules()))
def test_module_size(name):
    lines = all_modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (limit {MAX_LINES}): split it by capability"


def _definitions(func: str) -> list[str]:
    out = []
    for name, path in all_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
                out.append(name)
    return out


@pytest.mark.parametrize("func", ["normalized_entropy", "render_prompt_ids", "write_json_atomic", "atomic_write_text",
                                  "file_lock"])
def test_one_definition(func):
    assert len(_definitions(func)) == 1, f"{func} is defined in {_definitions(func)}"


def test_file_locking_and_atomic_renames_live_in_utils_io_only():
    offenders = []
    for name, path in all_modules().items():
        text = path.read_text()
        if name != "trl_onpolicy.utils.io" and ("fcntl.flock" in text or "os.replace(" in text):
            offenders.append(name)
    assert offenders == []


def test_old_module_paths_import_the_new_modules_with_a_deprecation_warning():
    import importlib
    import sys

    from trl_onpolicy._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old


def test_public_api_is_where_the_readme_says():
    from trl_onpolicy import HintedDataCollator, IDFTConfig, IDFTTrainer, hinted_decode, score_dataset
    from trl_onpolicy.losses import token_loss

    assert IDFTTrainer.__module__ == "trl_onpolicy.trainer.idft_trainer"
    assert IDFTConfig.__module__ == "trl_onpolicy.trainer.idft_config"
    assert HintedDataCollator.__module__ == "trl_onpolicy.trainer.online"
    assert callable(hinted_decode) and callable(score_dataset) and callable(token_loss)
