"""Run every tutorial in docs/examples so that the documentation cannot rot.

Tutorials check their claims with ``assert`` statements (e.g. a product against a
dense reference), so running one verifies what it teaches. They see
``CURVLINOPS_FAST_TUTORIALS=1`` and may shrink their problem sizes.

Each tutorial runs block by block (blocks start at ``# %%``), as sphinx-gallery
runs it for the documentation, which shows the value of a block's last line if
that line is an expression. Such a value must be worth reading: a default repr
like ``<matplotlib.colorbar.Colorbar object at 0x...>`` fails the test. Every
tutorial draws a figure: the first one is its thumbnail in the gallery.

A tutorial that imports an optional package (laplace-torch) is skipped, with the
reason, where that package is not installed.
"""

import ast
import re
from importlib.util import find_spec
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pytest

from test.utils import load_docs_module

TUTORIALS = sorted(
    (Path(__file__).parents[1] / "docs" / "examples").glob("example_*.py")
)
# Optional packages that tutorials may import, and how to get them.
OPTIONAL = {"laplace": "laplace-torch (`make install` installs it)"}
BLOCK_START = re.compile(r"^# %%", re.M)
DEFAULT_REPR = re.compile(r"object at 0x[0-9a-fA-F]+")


def code_blocks(path: Path) -> list[ast.Module]:
    """Parse a tutorial into its blocks, keeping the line numbers of the file."""
    source = path.read_text()
    starts = [0] + [match.start() for match in BLOCK_START.finditer(source)]
    blocks = []
    for start, end in zip(starts, starts[1:] + [len(source)]):
        block = ast.parse(source[start:end], filename=str(path))
        ast.increment_lineno(block, source.count("\n", 0, start))
        blocks.append(block)
    return blocks


def run_block(block: ast.Module, namespace: dict, path: Path):
    """Execute a block; return the value of its last line if that is an expression."""
    last = block.body[-1] if block.body else None
    if not isinstance(last, ast.Expr):
        exec(compile(block, str(path), "exec"), namespace)
        return None
    head = ast.Module(body=block.body[:-1], type_ignores=[])
    exec(compile(head, str(path), "exec"), namespace)
    return eval(compile(ast.Expression(last.value), str(path), "eval"), namespace)


def imported_packages(path: Path) -> set[str]:
    """Return the top-level packages that a tutorial imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def require_optional_packages(path: Path):
    """Skip a tutorial whose optional packages are missing; prepare laplace-torch."""
    optional = sorted(imported_packages(path) & OPTIONAL.keys())
    missing = [OPTIONAL[name] for name in optional if find_spec(name) is None]
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    if "laplace" in optional:  # it imports torchvision, see docs/_torchvision.py
        load_docs_module("_torchvision").import_torchvision_for_laplace()


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path: Path, monkeypatch, tmp_path):
    require_optional_packages(path)
    matplotlib.use("Agg")
    monkeypatch.setenv("CURVLINOPS_FAST_TUTORIALS", "1")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__", "__file__": str(path)}
    for block in code_blocks(path):  # raises if an assertion fails
        value = run_block(block, namespace, path)
        shown = "" if value is None else repr(value)
        assert not DEFAULT_REPR.search(shown), (
            f"{path.name}, line {block.body[-1].lineno}: the documentation would "
            f"show {shown!r}; assign the value or end the block with a statement."
        )
    figures = plt.get_fignums()
    plt.close("all")
    assert figures, f"{path.name} draws no figure for its gallery thumbnail."


def test_blocks_cover_the_whole_tutorial():
    """Splitting at ``# %%`` keeps every statement of a tutorial exactly once."""
    for path in TUTORIALS:
        whole = ast.parse(path.read_text())
        split = [node for block in code_blocks(path) for node in block.body]
        assert [ast.dump(node) for node in split] == [
            ast.dump(node) for node in whole.body
        ], path.name
