"""No module of msa/ or spool/ uses another module's private name, and msa
uses spool only through ``spool`` itself (its ``__all__``).

Walked in the AST of every file:

- ``from M import _x`` and ``import M._x`` / ``from M._x import ...``
  (a private name or module of M, ours or a library's or the standard
  library's);
- ``M._x`` where ``M`` is a name the file bound by an import (a module, or
  a name imported from one): ``spool.core._alive``, ``logging._startTime``;
- in msa/, ``import spool.core`` or ``from spool.group import ...``: the
  spool library's public API is the package.

Also ``getattr(M, "_x")``. Names of the file's own module (``_x`` defined
in it) and dunder names (``__version__``) are fine, and so is a line whose
comment starts ``# private:`` and says why no public name does the job. Private attributes of objects (``obj._x``) are
not checked here: the edge and relay still reach into aiosmtpd and
aiosmtplib objects until msa owns those protocols.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(p for d in ("msa", "spool") for p in (ROOT / d).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(source: str, in_msa: bool) -> list[str]:
    tree = ast.parse(source)
    excused = {n for n, line in enumerate(source.splitlines(), 1) if "# private:" in line}
    found: list[str] = []
    imported: set[str] = set()   # names bound by an import statement
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if any(_private(p) for p in parts):
                    found.append(f"line {node.lineno}: import {alias.name}")
                if in_msa and parts[0] == "spool" and len(parts) > 1:
                    found.append(f"line {node.lineno}: import {alias.name} (past spool's API)")
                imported.add(alias.asname or parts[0])
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            parts = module.split(".")
            if any(_private(p) for p in parts if p):
                found.append(f"line {node.lineno}: from {module} import ...")
            if in_msa and node.level == 0 and parts[0] == "spool" and len(parts) > 1:
                found.append(f"line {node.lineno}: from {module} import ... (past spool's API)")
            for alias in node.names:
                if _private(alias.name):  # the alias's own line: imports may span several
                    found.append(f"line {alias.lineno}: from {module} import {alias.name}")
                imported.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in imported:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[0], ast.Name) and node.args[0].id in imported
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return [f for f in found if int(f.split(":")[0].split()[1]) not in excused]


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_no_private_names_of_other_modules(path):
    found = violations(path.read_text(), in_msa=path.relative_to(ROOT).parts[0] == "msa")
    assert not found, f"{path.relative_to(ROOT)}: " + "; ".join(found)


@pytest.mark.parametrize("source,in_msa,expected", [
    ("from spool.core import _alive\n", True, 2),        # private and past the API
    ("import spool.core\n", True, 1),
    ("from spool import fsync_dir\n", True, 0),
    ("import logging\nx = logging._startTime\n", False, 1),
    ("import logging\nx = getattr(logging, '_startTime', 0)\n", False, 1),
    ("from a import _b  # private: no public name for it\n", False, 0),
    ("from a import (\n    b,\n    _c,  # private: no public name for it\n)\n", False, 0),
    ("from a import (\n    b,  # private: not this line's name\n    _c,\n)\n", False, 1),
    ("from msa.message import queuefile\nqueuefile._ISO_UTC.match('')\n", False, 1),
    ("import a.b\na.b._c()\n", False, 1),
    ("from x._impl import y\n", False, 1),
    ("def f(self):\n    return self._reader\n", False, 0),   # an object's, not a module's
    ("_mine = 1\nprint(_mine)\n", False, 0),
    ("import m\nm.__name__\n", False, 0),
])
def test_the_checker_finds_what_it_should(source, in_msa, expected):
    assert len(violations(source, in_msa)) == expected
