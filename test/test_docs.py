"""Check that the API reference documents every public name.

A name added to ``curvlinops.__all__`` or to the ``__all__`` of a public
sub-package listed in ``PUBLIC_MODULES`` must also be added to ``docs/api.rst``;
this test fails until it is, so the reference cannot silently fall behind. The
members that a directive lists must exist, and Sphinx must not ignore the lists.
The code shown on the pages ``index.rst`` and ``internals.rst`` must run.
"""

import ast
import re
from importlib import import_module
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from textwrap import dedent

import pytest
from torch import eye, float64, manual_seed, rand, randint
from torch.nn import CrossEntropyLoss, Linear, Sequential, Tanh

import curvlinops
import curvlinops.vivit
from curvlinops import HessianLinearOperator

# Modules whose ``__all__`` the API reference must document completely.
PUBLIC_MODULES = [curvlinops, curvlinops.vivit]
PUBLIC_NAMES = [
    f"{module.__name__}.{name}" for module in PUBLIC_MODULES for name in module.__all__
]

DOCS = Path(__file__).parents[1] / "docs"
API_RST = DOCS / "api.rst"
DIRECTIVE = re.compile(r"^\.\. auto(?:class|function|data|module):: (\S+)\s*$", re.M)
# a class or module directive with its option lines
WITH_OPTIONS = re.compile(r"^\.\. auto(?:class|module):: (\S+)\n((?:   :.*\n)*)", re.M)


def documented_targets() -> list[str]:
    """Return the dotted paths of all autodoc directives in the API reference."""
    return DIRECTIVE.findall(API_RST.read_text())


def listed_members() -> list[tuple[str, str]]:
    """Return ``(target, member)`` for every member named in a ``:members:`` list."""
    pairs = []
    for target, options in WITH_OPTIONS.findall(API_RST.read_text()):
        match = re.search(r":members: (.+)", options)
        if match:
            pairs += [(target, name.strip()) for name in match.group(1).split(",")]
    return pairs


def resolve(target: str):
    """Import a dotted path to a module, or to an attribute of a module."""
    try:
        return import_module(target)
    except ModuleNotFoundError:
        module_path, _, attribute = target.rpartition(".")
        return getattr(import_module(module_path), attribute)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_in_api_reference(name: str):
    module = name.rpartition(".")[0]
    assert name in documented_targets(), (
        f"{name} is in {module}.__all__ but not documented in "
        f"{API_RST.relative_to(API_RST.parents[1])}: add an autodoc directive."
    )


@pytest.mark.parametrize("target", documented_targets())
def test_documented_target_exists(target: str):
    resolve(target)  # raises if the target does not exist


@pytest.mark.parametrize("target, member", listed_members())
def test_listed_member_exists(target: str, member: str):
    assert hasattr(resolve(target), member), f"{target} has no member {member!r}."


def test_member_lists_take_effect():
    """With a default ``'members'`` option, Sphinx ignores the directives' lists."""
    tree = ast.parse((DOCS / "conf.py").read_text())
    defaults = next(
        ast.literal_eval(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(
            getattr(t, "id", None) == "autodoc_default_options" for t in node.targets
        )
    )
    assert "members" not in defaults, (
        "Set `:members:` per directive in docs/api.rst instead of in "
        "`autodoc_default_options`."
    )


def test_api_reference_has_no_duplicates():
    targets = documented_targets()
    duplicates = {t for t in targets if targets.count(t) > 1}
    assert not duplicates, f"Documented more than once: {sorted(duplicates)}"


def code_blocks(page: str) -> list[str]:
    """Return the Python code blocks of a documentation page, dedented."""
    pattern = re.compile(r"^\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", re.M)
    return [dedent(block) for block in pattern.findall((DOCS / page).read_text())]


def test_index_code_runs():
    for block in code_blocks("index.rst"):
        exec(block, {})


def test_internals_example_is_the_block_diagonal_hessian():
    """The operator written in internals.rst works and equals the built-in one."""
    (block,) = code_blocks("internals.rst")
    namespace = {}
    exec(block, namespace)
    manual_seed(0)
    model = Sequential(Linear(4, 3), Tanh(), Linear(3, 2)).to(float64)
    params, loss_func = list(model.parameters()), CrossEntropyLoss()
    X, y = rand(7, 4, dtype=float64), randint(0, 2, (7,))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    operator = namespace["DiagonalBlocksHessian"](model, loss_func, params, data)
    reference = HessianLinearOperator(
        model, loss_func, params, data, block_sizes=[1] * len(params)
    )
    identity = eye(operator.shape[1], dtype=float64)
    assert (operator @ identity).allclose(reference @ identity)


def test_gallery_order_lists_every_tutorial():
    spec = spec_from_file_location("_gallery_order", DOCS / "_gallery_order.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    tutorials = sorted(p.name for p in (DOCS / "examples").glob("example_*.py"))
    assert sorted(module.TUTORIALS) == tutorials
