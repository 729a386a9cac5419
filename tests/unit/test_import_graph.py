"""The rooms depend one way: the CLI (flannel_bpf/) -> bench -> lab -> cni -> controller -> loader -> ebpf.

A module may import its own room and the rooms below it, never one above: loader/ knows
nothing of the controller, the controller nothing of the lab or the bench."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Highest first; a room may import only rooms at its own rank or later in this list.
ROOMS = [("flannel_bpf", "flannel_bpf"), ("flannel_bpf.bench", "bench"),
         ("flannel_bpf.lab", "lab"), ("flannel_bpf.cni", "cni"), ("flannel_bpf.controller", "controller"),
         ("flannel_bpf.loader", "loader"), ("flannel_bpf.ebpf", "ebpf")]
RANK = {package: rank for rank, (package, _) in enumerate(ROOMS)}
# Leaves: modules that import nothing of the project, usable from every room (terminal output,
# the version string).
LEAVES = {"flannel_bpf.console": "flannel_bpf/console.py", "flannel_bpf": "flannel_bpf/__init__.py"}


def room_of(module: str) -> str | None:
    """The room a module lives in: the longest room package that contains it."""
    rooms = [p for p, _ in ROOMS if module == p or module.startswith(p + ".")]
    return max(rooms, key=len, default=None)


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module or "")
    return found


def back_edges() -> list[str]:
    edges = []
    for package, folder in ROOMS:
        for path in sorted((REPO / folder).rglob("*.py")):
            sub = path.relative_to(REPO / folder).with_suffix("").parts
            own_package = ".".join((package, *sub[:-1]))
            own_room = room_of(own_package)
            for module in imported_modules(path, own_package):
                target = room_of(module)
                if module in LEAVES:
                    continue
                if target is not None and RANK[target] < RANK[own_room]:
                    edges.append(f"{path.relative_to(REPO)} imports {module} ({package} -> {target})")
    return sorted(set(edges))


def test_rooms_import_only_downwards():
    assert back_edges() == []


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves_import_nothing_of_the_project(leaf):
    path = REPO / LEAVES[leaf]
    assert {m for m in imported_modules(path, leaf) if room_of(m)} == set()


def test_the_check_sees_a_back_edge(tmp_path, monkeypatch):
    """The check itself must be able to fail: a loader module importing the controller."""
    fake = tmp_path / "loader"
    fake.mkdir()
    (fake / "bad.py").write_text("from flannel_bpf.controller.agent import Agent\n")
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    for _, folder in ROOMS:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    assert back_edges() == ["loader/bad.py imports flannel_bpf.controller.agent "
                            "(flannel_bpf.loader -> flannel_bpf.controller)"]


@pytest.mark.parametrize("package", [p for p, _ in ROOMS])
def test_every_room_exists(package):
    folder = dict(ROOMS)[package]
    assert (REPO / folder).is_dir()
