"""A two-domain corpus that exists on every machine with Python: its standard library.

- original domain `en`: English prose, the docstrings and comments of each module;
- new domain `code`: the module's Python code with docstrings and comments stripped.

One document per source file and domain, so splitting by document (data_prep's
--val-fraction) is a split by file. Files are read in sorted order: the corpus
is identical on every run of the same Python version.
"""
from __future__ import annotations

import ast
import io
import json
import sysconfig
import tokenize
from pathlib import Path

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files)


def _docstring_nodes(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                yield node, body[0]


def split_file(source: str) -> tuple[str, str]:
    """Returns (english prose, code without docstrings/comments) for one module."""
    tree = ast.parse(source)
    prose = [ast.get_docstring(node, clean=True) or "" for node, _ in _docstring_nodes(tree)]
    comments = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            # Keep sentences, not separators, shebangs or pragmas.
            if len(text) > 20 and any(c.isalpha() for c in text) and not text.startswith(("!", "-*-", "noqa", "type:")):
                comments.append(text)
    for node, expr in list(_docstring_nodes(tree)):
        node.body.remove(expr)
        if not node.body:
            node.body.append(ast.Pass())
    english = "\n\n".join([p for p in prose if p] + ([" ".join(comments)] if comments else []))
    return english, ast.unparse(tree)


def build_corpus(out: Path, max_files: int | None = None) -> dict[str, Path]:
    """Writes out/en.jsonl and out/code.jsonl (one doc per file); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"en": out / "en.jsonl", "code": out / "code.jsonl"}
    tmp = {d: p.with_suffix(".jsonl.tmp") for d, p in paths.items()}
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()[:max_files] if max_files else stdlib_files()
    with open(tmp["en"], "w") as en, open(tmp["code"], "w") as code:
        for f in files:
            try:
                english, source = split_file(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, tokenize.TokenError):
                continue
            name = str(f.relative_to(root))
            if english.strip():
                en.write(json.dumps({"text": english, "source": name}) + "\n")
            if source.strip():
                code.write(json.dumps({"text": source, "source": name}) + "\n")
    for d in paths:
        tmp[d].replace(paths[d])
    return paths
