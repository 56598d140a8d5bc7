"""Self-checking contracts: every hook documented under its exact signature and tested; __all__ complete."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import host
from host import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def spec_functions() -> dict[str, object]:
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, "host_spec")
    }


def signature(name: str, fn: object) -> str:
    params = ", ".join(inspect.signature(fn).parameters)
    return f"{name}({params})"


def test_hook_names_list_matches_the_specs() -> None:
    assert set(hookspecs.HOOK_NAMES) == set(spec_functions())


def test_every_hook_has_a_contract_docstring() -> None:
    for name, fn in spec_functions().items():
        doc = inspect.getdoc(fn) or ""
        for needle in ("Called", "Return", "Results:", "raise"):
            assert needle in doc, f"{name}: contract docstring lacks {needle!r}"


def test_every_hook_is_documented_under_its_exact_signature() -> None:
    docs = (ROOT / "docs" / "hooks.md").read_text()
    headings = {line[4:].strip("` ") for line in docs.splitlines() if line.startswith("### ")}
    for name, fn in spec_functions().items():
        assert signature(name, fn) in headings, f"docs/hooks.md has no '### `{signature(name, fn)}`'"


def test_every_hook_has_a_test() -> None:
    names: set[str] = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        names |= {
            node.name
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_hook_")
        }
    for hook in spec_functions():
        assert any(hook in test for test in names), f"no test_hook_* test names {hook}"


def test_dunder_all_is_complete_and_sorted() -> None:
    public = {
        name
        for name, value in vars(host).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name not in {"annotations", "pluggy"}
    }
    assert set(host.__all__) == public | {"__version__"}
    assert list(host.__all__) == sorted(host.__all__)
