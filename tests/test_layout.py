"""The package layout the user asked for, and imports that point one way: server -> engine -> codecs."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each package may import from omnitalk, besides itself.
ALLOWED = {
    "server": {"engine", "codecs"},
    "engine": {"codecs"},
    "codecs": set(),
    "clients": set(),
}


def omnitalk_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("omnitalk.") and "." in name}
    return found


def test_top_level_layout():
    for entry in ("server", "engine", "codecs", "clients", "tests", "docker", "pyproject.toml"):
        assert (ROOT / entry).exists(), entry


# The `omnitalk` command is the one module that knows every part: `serve` starts the server, `bench` runs
# the load generator from clients/. Nothing else in server/ may reach into clients/.
COMMAND_LINE = ROOT / "server" / "cli.py"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        allowed = ALLOWED[package] | ({"clients"} if path == COMMAND_LINE else set())
        imported = omnitalk_imports(path) - {package}
        assert imported <= allowed, f"{path.relative_to(ROOT)} imports omnitalk.{imported}"


def test_packages_import_as_omnitalk_subpackages():
    import codecs

    import omnitalk.clients
    import omnitalk.codecs
    import omnitalk.engine
    import omnitalk.server

    assert Path(omnitalk.codecs.__file__).parent == ROOT / "codecs"
    assert Path(omnitalk.server.__file__).parent == ROOT / "server"
    assert hasattr(codecs, "encode"), "the standard library's codecs must not be shadowed"


def test_every_subpackage_is_listed_in_pyproject():
    """A non-editable install (docker, wheels) ships only the packages pyproject lists."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "omnitalk." + ".".join(init.parent.relative_to(ROOT).parts)
        for package in ALLOWED
        for init in (ROOT / package).rglob("__init__.py")
    }
    assert found == listed
