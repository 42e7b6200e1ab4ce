"""House rules for tests/: shared builders live in tests/helpers.py, so no test module imports another
test module, tests.conftest (pytest loads it; importing it runs it twice) or bench/ (benchmarks may
import tests.helpers, not the other way round)."""

from __future__ import annotations

import ast
import os

from tests.helpers import ROOT

TESTS = os.path.join(ROOT, "tests")


def forbidden(module: str) -> bool:
    parts = module.split(".")
    if parts[0] == "bench":
        return True
    return parts[0] == "tests" and len(parts) > 1 and (parts[1] == "conftest" or parts[1].startswith("test_"))


def imported_modules(tree: ast.AST) -> list[tuple[int, list[str]]]:
    """(line, modules it may load) of every import in `tree`: `from tests import test_x` may load tests.test_x."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from .test_x import y` / `from . import test_x` inside tests/
                base = "tests" + ("." + node.module if node.module else "")
            else:
                base = node.module or ""
            out.append((node.lineno, [base] + [f"{base}.{alias.name}" for alias in node.names]))
    return out


def violations(source: str, filename: str) -> list[str]:
    """One line per import statement that may load a forbidden module, naming the first such module."""
    found = []
    for line, modules in imported_modules(ast.parse(source, filename)):
        bad = [m for m in modules if forbidden(m)]
        if bad:
            found.append(f"{filename}:{line}: imports {bad[0]}")
    return found


def test_no_test_imports_another_test_module_conftest_or_bench():
    found = []
    for name in sorted(os.listdir(TESTS)):
        if name.endswith(".py"):
            with open(os.path.join(TESTS, name), encoding="utf-8") as f:
                found += violations(f.read(), name)
    assert found == []


def test_the_rule_catches_each_kind_of_import():
    # The check above passes on an empty list, so show it would see each form it is meant to refuse.
    bad = ("from tests.test_svd_merge import one_thread\n"
           "import tests.test_cli\n"
           "from tests import test_extract\n"
           "from .test_formats_fused import ai_toolkit_single_block\n"
           "from tests.conftest import ROOT\n"
           "from bench.fixtures import make_lora\n"
           "def f():\n    import bench.common\n")
    assert [v.split(": imports ")[1] for v in violations(bad, "x.py")] == [
        "tests.test_svd_merge", "tests.test_cli", "tests.test_extract", "tests.test_formats_fused",
        "tests.conftest", "bench.fixtures", "bench.common"]
    fine = "from tests.helpers import ROOT\nimport tests.helpers\nfrom library.cli import parse_args\nimport torch\n"
    assert violations(fine, "y.py") == []
