"""Every repository path and ``moejax.`` name that the docs mention exists.

Checked: README.md, benchmarks/RESULTS.md, the experiments' READMEs, and the docstrings of
every Python file in the repository (module, class and function docstrings). A path is a
word that starts with one of the repository's top-level folders (``moejax/``,
``benchmarks/``, ...); a ``moejax.`` name is resolved statically, file by file: the longest
prefix that is a module, then a top-level name defined or imported there (and a class's
member). Placeholders (``configs/NAME.py``, ``runs/cpu/ARM``) are all-capital words.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = ("moejax", "benchmarks", "tests", "configs", "experiments", ".ci")
PATH = re.compile(r"(?<![\w/.\-])((?:%s)/[\w/.\-]*\w)" % "|".join(re.escape(t) for t in TOP))
NAME = re.compile(r"(?<![\w/.])(moejax(?:\.\w+)+)")
CAPITALISED_FILES = {"README", "RESULTS", "LICENSE", "CHANGELOG"}
DOCS = ["README.md", "benchmarks/RESULTS.md", *sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "experiments", "*", "README.md")))]


def _python_files() -> list[str]:
  files = glob.glob(os.path.join(ROOT, "*.py"))
  for top in TOP:
    files += glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True)
  return sorted(os.path.relpath(f, ROOT) for f in files if f"{os.sep}runs{os.sep}" not in f)


def _docstrings(path: str) -> str:
  with open(os.path.join(ROOT, path)) as f:
    tree = ast.parse(f.read())
  nodes = (n for n in ast.walk(tree)
           if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
  return "\n".join(d for d in map(ast.get_docstring, nodes) if d)


def _placeholder(path: str) -> bool:
  stems = (os.path.splitext(part)[0] for part in path.split("/"))
  return any(re.fullmatch(r"[A-Z][A-Z_]*", s) and s not in CAPITALISED_FILES for s in stems)


def _module_file(dotted: str) -> str | None:
  base = os.path.join(ROOT, *dotted.split("."))
  for candidate in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.isfile(candidate):
      return candidate
  return None


@functools.lru_cache(maxsize=None)
def _top_level(module_file: str) -> dict[str, ast.AST | None]:
  """{name: its ClassDef (or None)} of what ``module_file`` defines, assigns or imports."""
  with open(module_file) as f:
    tree = ast.parse(f.read())
  names: dict[str, ast.AST | None] = {}
  for node in ast.walk(tree):   # nested too: names set under if / try
    if isinstance(node, ast.ClassDef):
      names[node.name] = node
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      names[node.name] = None
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update({(a.asname or a.name).split(".")[0]: None for a in node.names})
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
      names[node.id] = None
  return names


def _resolves(name: str) -> bool:
  parts = name.split(".")
  for i in range(len(parts), 0, -1):
    module_file = _module_file(".".join(parts[:i]))
    if module_file is None:
      continue
    rest = parts[i:]
    if not rest:
      return True
    names = _top_level(module_file)
    if rest[0] not in names:
      return False
    owner = names[rest[0]]
    if len(rest) > 1 and isinstance(owner, ast.ClassDef):
      members = {n.name for n in ast.walk(owner) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
      members |= {n.id for n in ast.walk(owner) if isinstance(n, ast.Name)}
      return rest[1] in members
    return True
  return False


def _text(source: str) -> str:
  if source.endswith(".py"):
    return _docstrings(source)
  with open(os.path.join(ROOT, source)) as f:
    return f.read()


def _missing(source: str) -> list[str]:
  text = _text(source)
  missing = [p for p in (m.rstrip(".") for m in PATH.findall(text))
             if not _placeholder(p) and not os.path.exists(os.path.join(ROOT, p))]
  if not source.startswith("tests/"):   # tests name made-up modules in their docstrings
    missing += [n for n in NAME.findall(text) if not _resolves(n)]
  return sorted(set(missing))


@pytest.mark.parametrize("doc", DOCS)
def test_paths_and_names_in_the_markdown_docs_exist(doc):
  assert not _missing(doc), f"{doc} mentions what is not in the repository: {_missing(doc)}"


def test_paths_and_names_in_docstrings_exist():
  missing = {py: m for py in _python_files() if (m := _missing(py))}
  assert not missing, f"docstrings mention what is not in the repository: {missing}"


def test_the_check_sees_a_missing_path_and_a_missing_name():
  text = "see `moejax/no_such_module.py` and moejax.benchmarking.timing.no_such_function"
  assert [p for p in PATH.findall(text) if not os.path.exists(os.path.join(ROOT, p))] == [
      "moejax/no_such_module.py"]
  assert [n for n in NAME.findall(text) if not _resolves(n)] == [
      "moejax.benchmarking.timing.no_such_function"]
  assert _resolves("moejax.benchmarking.timing.round_robin") and _resolves("moejax.layers.moe.MoE")
  assert _placeholder("configs/NAME.py") and not _placeholder("benchmarks/RESULTS.md")
