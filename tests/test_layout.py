"""The layout's one rule: imports point one way, down the table in README.md ("Layout").

Every import of every module is read with ``ast`` (function-level and TYPE_CHECKING
imports too) and mapped to its part of the design. A module may import its own part
and the parts below it, never one above or beside it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom first. A module may import parts with a lower rank, and its own part.
LAYERS: list[tuple[str, ...]] = [
    ("netlink",),
    ("agent.engine",),
    ("agent.control",),
    ("agent.binder",),
    ("agent.sessions",),
    ("exporters",),
    ("agent.daemon",),
    ("agent.commands",),
    ("agent.cli",),
    ("agent.__main__",),
]
SHARED = {"agent", "agent.__version__"}  # the bare package holds only __version__: anyone may read it


def part_of(module: str) -> tuple[int, str] | None:
    """(rank, part) of a dotted module name, or None for third-party/stdlib/shared."""
    if module in SHARED:
        return None
    best: tuple[int, str] | None = None
    for rank, parts in enumerate(LAYERS):
        for part in parts:
            if (module == part or module.startswith(part + ".")) and (best is None or len(part) > len(best[1])):
                best = (rank, part)
    if best is None and module.split(".")[0] in ("agent", "netlink", "exporters"):
        raise AssertionError(f"{module} belongs to no part of the layout: add it to LAYERS")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # "from agent.control import keyring" imports agent.control.keyring
            out += [(node.lineno, f"{target}.{a.name}") if target in ("agent", "agent.binder", "agent.daemon",
                                                                       "agent.sessions", "agent.engine",
                                                                       "agent.control", "agent.commands")
                    else (node.lineno, target) for a in node.names]
    return out


def violations(root: Path) -> list[str]:
    bad = []
    files = [p for top in ("agent", "netlink", "exporters") for p in sorted((root / top).rglob("*.py"))]
    for path in files:
        me = module_name(path, root)
        if me in SHARED:
            continue
        mine = part_of(me)
        assert mine is not None, me
        for line, target in imports_of(path, me):
            theirs = part_of(target)
            if theirs is None or theirs[1] == mine[1]:
                continue
            if theirs[0] >= mine[0]:
                where = "upward" if theirs[0] > mine[0] else "sideways"
                bad.append(f"{path.relative_to(root)}:{line}: {mine[1]} imports {target} ({where})")
    return bad


def test_imports_point_down_the_layout() -> None:
    assert violations(ROOT) == []


def test_every_part_is_a_package_that_says_what_it_may_import() -> None:
    for parts in LAYERS:
        for part in parts:
            path = ROOT / part.replace(".", "/")
            if path.is_dir():
                doc = ast.get_docstring(ast.parse((path / "__init__.py").read_text())) or ""
                assert "May import" in doc, f"{part}/__init__.py must say what it may import"


def test_the_old_rooms_are_gone() -> None:
    # Sources only: an old checkout may keep an ignored agent/test/__pycache__ after a pull.
    assert not list((ROOT / "agent" / "test").glob("*.py"))
    for name in ("binder", "bound", "session", "metrics", "daemon", "config", "keyring", "timestamping"):
        assert not (ROOT / "agent" / f"{name}.py").exists(), name


@pytest.mark.parametrize(("where", "line", "kind"), [
    ("agent/engine/bad.py", "from agent.sessions import results\n", "upward"),
    ("netlink/bad.py", "def f():\n    from agent.engine import clock\n", "upward"),
    ("agent/control/bad.py", "from ..binder import keys\n", "upward"),
    ("agent/daemon/bad.py", "from agent.commands import ping\n", "upward"),
    ("agent/cli.py", "import agent.commands\n", None),
    ("agent/sessions/ok.py", "from agent.engine import udp\nfrom . import results\n", None),
])
def test_the_check_catches_an_upward_import(tmp_path: Path, where: str, line: str, kind: str | None) -> None:
    """A throwaway tree with one planted module: the checker must flag it (or accept it)."""
    for top in ("agent", "netlink", "exporters"):
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    for sub in ("engine", "control", "binder", "sessions", "daemon", "commands"):
        (tmp_path / "agent" / sub).mkdir()
        (tmp_path / "agent" / sub / "__init__.py").write_text("")
    (tmp_path / where).write_text(line)
    found = violations(tmp_path)
    if kind is None:
        assert found == []
    else:
        assert len(found) == 1 and kind in found[0] and where in found[0]
