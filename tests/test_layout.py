"""The layout shows the architecture: ``menos/`` is what both sides share, ``manager/``
and ``worker/`` are the two server processes. Imports run down into ``menos/`` only
(the manager imports ``worker.launcher`` once, to fork it after the imports a worker
needs); nothing in ``menos/`` or ``worker/`` reaches back up into ``manager/``."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(package: str):
    for root, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.Import):
                        yield from ((path, a.name) for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        yield path, node.module


@pytest.mark.parametrize("package, forbidden", [("menos", ("manager", "worker", "tools")),
                                                ("worker", ("manager", "tools"))])  # fmt: skip
def test_imports_run_down_into_the_shared_package(package, forbidden):
    up = [(os.path.relpath(p, REPO), m) for p, m in _imports(package) if m.split(".")[0] in forbidden]
    assert not up, up
