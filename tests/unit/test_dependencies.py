"""What a fresh `pip install -e .` brings must be enough to import lathe: every third-party package
imported at module level is a declared dependency, and every package imported later (inside a
function, for an optional feature) is a dependency or belongs to an extra. The run-time half (the
README's first command in a fresh virtual environment without the dev extras, and one line naming
the extra for each missing optional package) is scripts/fresh_install_check.sh, run by .ci/run."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "google": "protobuf", "PIL": "pillow", "tomli": "tomli"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower().replace("-", "_") for r in requirements}


def _project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _third_party_imports() -> tuple[dict[str, str], dict[str, str]]:
    """({package: first file} imported at module level, {package: first file} imported elsewhere)."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    top, nested = {}, {}
    for path in sorted((REPO / "lathe").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        # `try: import tomllib / except ImportError: import tomli` at module level: the fallback is
        # a conditional dependency (declared with a python_version marker), still module level.
        module_level = {id(n) for n in tree.body}
        module_level |= {id(x) for n in tree.body if isinstance(n, ast.Try) for x in ast.walk(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                pkg = name.split(".")[0]
                if pkg in stdlib or pkg == "lathe":
                    continue
                where = top if id(node) in module_level else nested
                where.setdefault(pkg, str(path.relative_to(REPO)))
    return top, nested


def test_module_level_imports_are_declared_dependencies():
    declared = _names(_project()["dependencies"])
    top, _ = _third_party_imports()
    missing = {pkg: f for pkg, f in top.items() if DISTRIBUTION.get(pkg, pkg).lower() not in declared}
    assert not missing, f"imported at module level but not in pyproject's dependencies: {missing}"
    # the packages the issue found missing on a fresh machine: numpy (data) and safetensors (convert)
    assert {"numpy", "safetensors", "torch"} <= declared


def test_every_later_import_is_a_dependency_or_an_extra():
    project = _project()
    known = _names(project["dependencies"])
    for extra, reqs in project["optional-dependencies"].items():
        if extra != "dev":
            known |= _names(reqs)
    _, nested = _third_party_imports()
    # transformers is imported only by the tests (model parity): lathe itself never imports it.
    unknown = {pkg: f for pkg, f in nested.items() if DISTRIBUTION.get(pkg, pkg).lower() not in known}
    assert not unknown, f"imported by lathe but neither a dependency nor in an extra (not dev): {unknown}"


def test_dev_extra_holds_every_user_extra():
    """CI installs .[dev]: it must bring each optional feature's package, so the features are tested."""
    extras = _project()["optional-dependencies"]
    dev = _names(extras["dev"])
    for extra, reqs in extras.items():
        assert _names(reqs) <= dev, f"[{extra}] has packages that [dev] lacks: {_names(reqs) - dev}"


def test_fresh_install_check_runs_the_readme_first_command():
    script = (REPO / "scripts" / "fresh_install_check.sh").read_text()
    first = 'pip install "torch==2.13.0" -e . && lathe train'
    assert first in (REPO / "README.md").read_text()
    assert first in script
    assert "fresh_install_check.sh" in (REPO / ".ci" / "run").read_text()
