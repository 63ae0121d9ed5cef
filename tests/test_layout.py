"""The package layout the product card fixes: ``lorasuite_core`` subpackages by concept, imports in one direction.

Every import statement of every module (lazy ones inside functions included) is read with
``ast``; a module may import its own subpackage and the layers below it, never a layer above
or beside it, and nothing in ``lorasuite_core`` imports Prefect, ``flows``, ``tasks`` or
``deployments``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "lorasuite_core"
# rank of each part: a module may import parts of strictly lower rank, and its own part
# (report sits above transfer and training: the migration report is built from their results)
RANK = {"errors": 0, "__init__": 0, "settings": 0.5, "io": 1, "models": 2,
        "transfer": 3, "training": 3, "report": 3.5, "serving": 3, "pipeline": 4, "testing": 4}
FORBIDDEN_TOP = {"prefect", "prefect_ray", "flows", "tasks", "deployments"}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lorasuite_core":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(CORE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if _part(module) == "__init__":      # from lorasuite_core import <part>
                found += [(node.lineno, f"lorasuite_core.{a.name}") for a in node.names if a.name in RANK]
    return found


def _modules():
    return sorted(p for p in CORE.rglob("*.py"))


def test_every_module_belongs_to_a_known_part():
    unknown = [str(p.relative_to(CORE)) for p in _modules()
               if (p.relative_to(CORE).parts[0].removesuffix(".py")) not in RANK]
    assert not unknown, f"modules outside the layout: {unknown}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(CORE)))
def test_imports_go_one_way(path: Path):
    own = path.relative_to(CORE).parts[0].removesuffix(".py")
    problems = []
    for line, module in _imports(path):
        top = module.split(".")[0]
        if top in FORBIDDEN_TOP:
            problems.append(f"line {line}: imports {module} (lorasuite_core never imports the orchestration)")
        part = _part(module)
        if part is None or part == own or part == "__init__":
            continue
        if RANK[part] >= RANK[own]:
            problems.append(f"line {line}: {own} (rank {RANK[own]}) imports {module} (rank {RANK[part]})")
    assert not problems, "; ".join(problems)


def test_the_check_sees_a_wrong_way_import(tmp_path):
    bad = tmp_path / "lorasuite_core" / "io" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from lorasuite_core.pipeline import stages\nfrom ..transfer import cka\nimport prefect\n")
    global CORE
    saved, CORE = CORE, tmp_path / "lorasuite_core"
    try:
        modules = [m for _, m in _imports(bad)]
    finally:
        CORE = saved
    assert [_part(m) for m in modules] == ["pipeline", "transfer", None]
    assert modules[2] == "prefect"
