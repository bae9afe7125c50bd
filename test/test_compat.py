"""The public API of curvlinops 3.0.1 holds for ours, line by line.

``test/compat/curvlinops-3.0.1-api.txt`` lists every public module, name, class,
method, property and signature of curvlinops 3.0.1 (vendored from the project's
compatibility reference). Each line becomes one test case. A listed signature must
be a prefix of ours: same parameter names, kinds, order and defaults; parameters we
add come after 3.0.1's and have defaults (or are keyword-only), so that every call
written for 3.0.1 binds the same way on ours. Annotations are not compared.
"""

from __future__ import annotations

import ast
import enum
import inspect
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import pytest

API_FILE = Path(__file__).parent / "compat" / "curvlinops-3.0.1-api.txt"
_OPEN, _CLOSE = "([{<", ")]}>"


@dataclass
class Entry:
    """One line of the API file: a name, its kind and what follows it."""

    module: str
    owner: str | None  # the class a member belongs to, None at module level
    kind: str  # class, def, value, attribute, method, classmethod, property
    name: str
    rest: str  # the signature or value text after the name
    defined_in: str | None

    @property
    def id(self) -> str:
        where = f"{self.module}.{self.owner}" if self.owner else self.module
        return f"{where}.{self.name}"


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split ``text`` at ``separator`` outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for idx, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
        elif depth == 0 and text.startswith(separator, idx) and idx >= start:
            parts.append(text[start:idx])
            start = idx + len(separator)
    parts.append(text[start:])
    return parts


def _parameter_text(signature: str) -> str:
    """The text between a signature's outer parentheses."""
    assert signature.startswith("("), signature
    depth, quote = 0, None
    for idx, char in enumerate(signature):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            depth += 1
        elif char in _CLOSE:
            depth -= 1
            if depth == 0:
                return signature[1:idx]
    raise ValueError(f"Unbalanced signature: {signature}")


def parse_parameters(signature: str) -> list[tuple[str, str | None]]:
    """Parameters ``(name, default repr or None)`` of a listed signature.

    Names keep their ``*``/``**`` prefixes; a bare ``*`` is its own entry.
    """
    text = _parameter_text(signature).strip()
    if not text:
        return []
    parameters = []
    for part in _split_top_level(text, ","):
        declaration, *default = _split_top_level(part.strip(), " = ")
        if not default and ":" not in declaration:  # unannotated: name=default
            declaration, *default = _split_top_level(declaration, "=")
        name = _split_top_level(declaration, ":")[0].strip()
        parameters.append((name, default[0].strip() if default else None))
    return parameters


def parse_api_file(path: Path = API_FILE) -> list[Entry]:
    """Read the module sections of the API file into entries."""
    entries, module, owner = [], None, None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            module = line.removeprefix("## module ") if "## module " in line else None
            owner = None
            continue
        if module is None or not line.strip():
            continue
        member = line.startswith("    ")
        kind, _, remainder = line.strip().partition(" ")
        remainder, _, defined_in = remainder.partition("  [defined in ")
        name_end = min(
            (i for i in (remainder.find("("), remainder.find(" ")) if i >= 0),
            default=len(remainder),
        )
        name, rest = remainder[:name_end], remainder[name_end:].strip()
        entry = Entry(
            module,
            owner if member else None,
            kind,
            name,
            rest,
            defined_in.rstrip("]") or None,
        )
        entries.append(entry)
        if not member and kind == "class":
            owner = name
    return entries


ENTRIES = parse_api_file()


def _resolve(entry: Entry):
    """Our object for an entry, looked up the way a 3.0.1 user would."""
    obj = import_module(entry.module)
    if entry.owner is not None:
        obj = getattr(obj, entry.owner)
    assert hasattr(obj, entry.name), f"{entry.id} is missing"
    return obj


def _check_signature(ours: inspect.Signature, listed: str, what: str):
    """Assert that ``listed`` parameters start ``ours``, with equal defaults."""
    expected = parse_parameters(listed)
    actual = list(ours.parameters.values())
    prefix = {
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    names = [prefix.get(p.kind, "") + p.name for p in actual]
    listed_names = [name for name, _ in expected if name != "*"]
    assert names[: len(listed_names)] == listed_names, (
        f"{what}: parameters {names} do not start with 3.0.1's {listed_names}"
    )
    defaults = dict(expected)
    for parameter in actual[: len(listed_names)]:
        name = prefix.get(parameter.kind, "") + parameter.name
        has_default = parameter.default is not inspect.Parameter.empty
        want = defaults[name]
        if want is None:  # no default in 3.0.1: every 3.0.1 call passes a value
            continue
        got = repr(parameter.default) if has_default else None
        assert got == want, f"{what}: default of {name} is {got}, 3.0.1 has {want}"
    keyword_only = "*" in [name for name, _ in expected]
    for parameter in actual[len(listed_names) :]:
        required = parameter.default is inspect.Parameter.empty and parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        )
        assert not required, f"{what}: our extra parameter {parameter.name} is required"
    if keyword_only:
        kinds = {p.name: p.kind for p in actual}
        after_star = expected[[n for n, _ in expected].index("*") + 1 :]
        for name, _ in after_star:
            if not name.startswith("*"):
                assert kinds[name] == inspect.Parameter.KEYWORD_ONLY, (
                    f"{what}: {name} must be keyword-only as in 3.0.1"
                )


def _check_enum(cls, rest: str, what: str):
    assert isinstance(cls, type) and issubclass(cls, enum.Enum), f"{what}: not an enum"
    members = ast.literal_eval(rest[len("(enum) members=") :])
    assert [(m.name, m.value) for m in cls] == members, f"{what}: members differ"


def _check_attribute(owner, entry: Entry):
    value = getattr(owner, entry.name)
    listed = entry.rest.removeprefix("= ")
    try:
        assert value == ast.literal_eval(listed), f"{entry.id}: {value!r} != {listed}"
    except (ValueError, SyntaxError):  # a repr that is not a literal, maybe cut off
        assert repr(value).startswith(listed), f"{entry.id}: {value!r} vs {listed}"


def _check_member_kind(owner, entry: Entry):
    static = inspect.getattr_static(owner, entry.name)
    if entry.kind == "property":
        assert isinstance(static, property), f"{entry.id} must be a property"
    elif entry.kind == "classmethod":
        assert isinstance(static, classmethod), f"{entry.id} must be a classmethod"
    else:  # method
        assert inspect.isfunction(static), f"{entry.id} must be a plain method"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e.kind}:{e.id}")
def test_api_entry(entry: Entry):
    """One line of 3.0.1's API holds for ours."""
    owner = _resolve(entry)
    obj = getattr(owner, entry.name)
    if entry.defined_in is not None:
        home = import_module(entry.defined_in)
        assert getattr(home, entry.name, None) is obj, (
            f"{entry.id} must also be {entry.defined_in}.{entry.name}"
        )
    if entry.kind == "class" and entry.rest.startswith("(enum)"):
        _check_enum(obj, entry.rest, entry.id)
    elif entry.kind in ("class", "def"):
        assert callable(obj), f"{entry.id} is not callable"
        _check_signature(inspect.signature(obj), entry.rest, entry.id)
    elif entry.kind == "attribute":
        _check_attribute(owner, entry)
    elif entry.kind in ("method", "classmethod", "property"):
        _check_member_kind(owner, entry)
        if entry.kind != "property":
            function = inspect.getattr_static(owner, entry.name)
            function = getattr(function, "__func__", function)  # with cls
            _check_signature(inspect.signature(function), entry.rest, entry.id)
    else:
        assert entry.kind == "value", f"unknown kind {entry.kind}"


def test_api_file_parsed():
    """The parser sees every line of the file (a format change must not hide lines)."""
    kinds = {"class", "def", "value", "attribute", "method", "classmethod", "property"}
    assert {e.kind for e in ENTRIES} <= kinds
    assert len(ENTRIES) == 167
    assert parse_parameters("(a, b: 'X[int, str]' = (1, 2), *, c = <E.A: 'a'>)") == [
        ("a", None),
        ("b", "(1, 2)"),
        ("*", None),
        ("c", "<E.A: 'a'>"),
    ]
    assert parse_parameters("(cls, *, boundary=None, **kwds)") == [
        ("cls", None),
        ("*", None),
        ("boundary", "None"),
        ("**kwds", None),
    ]


@pytest.mark.parametrize("name", ["FisherType", "KFACType"])
def test_enums_pickle_as_in_3_0_1(name: str):
    """Pickled 3.0.1 state dicts name ``curvlinops.kfac.<enum>``; ours must too."""
    import pickle

    kfac = import_module("curvlinops.kfac")
    cls = getattr(kfac, name)
    assert (cls.__module__, cls.__qualname__) == ("curvlinops.kfac", name)
    member = next(iter(cls))
    assert pickle.loads(pickle.dumps(member)) is member
    assert b"curvlinops.kfac" in pickle.dumps(member)
