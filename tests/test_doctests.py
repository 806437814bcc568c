"""The examples in mailer's docstrings are run, so they stay true."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mailer

MODULES = sorted(
    m.name for m in pkgutil.iter_modules(mailer.__path__, "mailer.") if m.name != "mailer.__main__"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) in {name} failed (run with -s to see)"
