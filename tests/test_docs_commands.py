"""Finding 9 (issue 19): the documented commands work as written from a fresh checkout.

Every command line in the ``bash`` blocks of README.md and docs/pipeline.md runs through ``make``
(a target the Makefile defines) or ``.venv/bin/`` (a console script the environment installs, or
``python -m`` a module that exists), never a bare ``prefect``/``python``/``lorasuite`` that needs an
activated virtual environment; and README and docs/pipeline.md give the same local server recipe.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/pipeline.md")
RECIPE = "make serve PORT=4200 && export PREFECT_API_URL=http://127.0.0.1:4200/api"
SHELL_BUILTINS = {"export", "cd", "docker", "git"}


def bash_commands(path: Path) -> list[str]:
    """Command lines of the ``bash`` blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def check(command: str) -> str | None:
    """Why ``command`` would not run from a fresh checkout's root, or None."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):      # VAR=value prefixes
        words.pop(0)
    if not words:
        return None
    program = words[0]
    if program == "make":
        unknown = [w for w in words[1:] if "=" not in w and w not in make_targets()]
        return f"unknown make target {unknown}" if unknown else None
    if program in SHELL_BUILTINS:
        return None
    if not program.startswith(".venv/bin/"):
        return f"{program!r} needs an activated environment: write .venv/bin/{program} or a make target"
    name = program.removeprefix(".venv/bin/")
    if not (Path(sys.prefix) / "bin" / name).exists():
        return f"{program} is not installed by the project"
    if name.startswith("python") and words[1:2] == ["-m"] and importlib.util.find_spec(words[2]) is None:
        return f"no module {words[2]}"
    return None


def test_documented_commands_run_from_a_fresh_checkout():
    problems = {(doc, command): why for doc in DOCS for command in bash_commands(ROOT / doc)
                if (why := check(command))}
    assert problems == {}
    assert check("prefect variable set x y") and check("python -m deployments.serve") and check("make nope")


def test_one_local_server_recipe():
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        assert RECIPE in text, doc
        assert "prefect server start &" not in text and "\nprefect server start" not in text, doc
    assert "--port $(PORT)" in (ROOT / "Makefile").read_text()
