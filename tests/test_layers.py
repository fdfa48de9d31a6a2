"""The layers of docs/design.md, held: every import in src/m3tune points down, never back.

Read from the source (ast), not from what an import run happens to load: the lazy imports inside functions,
which are most of m3tune's imports of its own heavy parts, count as much as the ones at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "m3tune"

# Top first. A unit is a sub-package or a module of m3tune's root ("__init__" is the root package itself).
LAYERS: list[tuple[str, frozenset[str]]] = [
    ("entry points and tools", frozenset({"cli", "stepcli", "bench", "gold"})),
    ("executors", frozenset({"deploy", "executor"})),
    ("pipeline", frozenset({"pipeline"})),
    ("steps", frozenset({"corpus", "generation", "index", "mining", "combine", "analysis", "training",
                         "evaluation", "publish"})),
    # the foundation, in its own order: integrity (manifest, runroot) wraps storage, never the reverse
    ("encoder, step context", frozenset({"encoder", "context"})),
    ("run root", frozenset({"runroot", "runlock"})),
    ("manifests", frozenset({"manifest"})),
    ("files", frozenset({"jsonl", "names", "yamlfile"})),
    ("storage, records", frozenset({"storage", "records", "redact", "progress", "apiclient"})),
    ("base", frozenset({"arabic", "errors", "procs", "__init__"})),
]
# Units of one layer do not import each other, except along the arrows below. The steps': what a step reads of
# another step's package (acyclic: corpus reads none, generation never evaluation, evaluation never training).
STEP_READS: dict[str, frozenset[str]] = {
    "corpus": frozenset(),
    "analysis": frozenset(),
    "generation": frozenset({"corpus"}),
    "index": frozenset({"corpus"}),
    "training": frozenset({"corpus"}),
    "mining": frozenset({"corpus", "index"}),
    "evaluation": frozenset({"corpus", "index"}),  # the passages, the index step's cached vectors
    "combine": frozenset({"corpus", "evaluation"}),  # the gold, for the leakage check
    "publish": frozenset({"corpus", "index", "evaluation"}),  # the served fusion is the evaluated one
}
# The command line runs the pipeline's steps (stepcli builds their commands) and the benchmarks; the gold
# builder is nobody's import: the runtime only reads the files it wrote.
ENTRY_READS: dict[str, frozenset[str]] = {"cli": frozenset({"stepcli", "bench"})}
SIBLINGS = {"steps": STEP_READS, "entry points and tools": ENTRY_READS}


def rank(unit: str) -> tuple[int, str]:
    for i, (name, units) in enumerate(LAYERS):
        if unit in units:
            return len(LAYERS) - i, name
    raise KeyError(unit)


def _module_of(path: Path, src: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if package else parts), package


def _is_module(src: Path, name: str) -> bool:
    return (src / name).is_dir() or (src / f"{name}.py").is_file()


def imports(src: Path) -> list[tuple[str, int, str]]:
    """(file relative to SRC's parent, line, imported m3tune module), once each, for every import under SRC,
    wherever it stands (a function's body, a TYPE_CHECKING block)."""
    found = []
    for path in sorted(src.rglob("*.py")):
        module, package = _module_of(path, src)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if package else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from m3tune import storage` imports the module storage: name it, not the package
                targets = [f"{target}.{alias.name}" if target == "m3tune" and _is_module(src, alias.name) else target
                           for alias in node.names]
            else:
                continue
            rel = str(path.relative_to(src.parent))
            found += [(rel, node.lineno, t) for t in targets if t == "m3tune" or t.startswith("m3tune.")]
    return sorted(set(found))


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def back_arrows(src: Path) -> list[str]:
    """Every import under SRC that points up a layer, across its own layer where that is not allowed, or to
    a unit no layer names (a new module must be placed)."""
    wrong = []
    for rel, line, target in imports(src):
        source_module, _ = _module_of(src.parent / rel, src)
        a, b = unit_of(source_module), unit_of(target)
        if a == b:
            continue
        try:
            (ra, layer), (rb, _) = rank(a), rank(b)
        except KeyError as e:
            wrong.append(f"{rel}:{line}: imports {target}: {e.args[0]!r} is in no layer of tests/test_layers.py")
            continue
        if ra < rb:
            wrong.append(f"{rel}:{line}: imports {target}: {a} ({layer}) reaches up to {b} ({rank(b)[1]})")
        elif ra == rb and b not in SIBLINGS.get(layer, {}).get(a, frozenset()):
            wrong.append(f"{rel}:{line}: imports {target}: {a} reaches across to {b}, beside it in {layer}")
    return wrong


def test_every_unit_is_in_one_layer():
    units = {unit_of(_module_of(p, SRC)[0]) for p in SRC.rglob("*.py")}
    placed = [u for _, layer in LAYERS for u in layer]
    assert len(placed) == len(set(placed)), "a unit is in two layers"
    assert units == set(placed), f"unplaced: {sorted(units - set(placed))}, gone: {sorted(set(placed) - units)}"


def test_steps_read_each_other_one_way():
    assert set(STEP_READS) == dict(LAYERS)["steps"]
    done: set[str] = set()
    while len(done) < len(STEP_READS):  # peel off the steps whose reads are all done: a cycle leaves some
        ready = {s for s, reads in STEP_READS.items() if s not in done and reads <= done}
        assert ready, f"the steps' arrows go round: {sorted(set(STEP_READS) - done)}"
        done |= ready


def test_no_back_arrow():
    wrong = back_arrows(SRC)
    assert not wrong, "imports against the layers of docs/design.md:\n" + "\n".join(wrong)


@pytest.mark.parametrize("source, expected", [
    ("from m3tune.executor import run_step", "training (steps) reaches up to executor (executors)"),
    ("from m3tune import manifest", "storage (storage, records) reaches up to manifest (manifests)"),
    ("from ..training import heads", "evaluation reaches across to training, beside it in steps"),
    ("import m3tune.evaluation.gold", "generation reaches across to evaluation, beside it in steps"),
])
def test_a_back_arrow_is_caught(tmp_path, source, expected):
    """The checker on a copy of the package with one import added, lazily, inside a function."""
    import shutil

    copy = tmp_path / "m3tune"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__", "data", "prompts", "deepspeed"))
    unit = expected.split(" ", 1)[0]
    target = copy / f"{unit}.py" if (copy / f"{unit}.py").exists() else copy / unit / "__init__.py"
    if unit == "evaluation":
        target = copy / "evaluation" / "m3.py"
    target.write_text(target.read_text(encoding="utf-8") + f"\n\ndef _added():\n    {source}\n", encoding="utf-8")
    wrong = back_arrows(copy)
    assert len(wrong) == 1 and expected in wrong[0], wrong
    assert wrong[0].startswith(f"m3tune/{target.relative_to(copy).as_posix()}:")
