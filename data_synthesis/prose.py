"""Real English prose that every Python installation ships, for stage-1 reconstruction pretraining without a
download: the docstrings of CPython's standard library (Python Software Foundation License 2.0, which allows use,
copying and derived works with its notice kept). Files are parsed with `ast`, so nothing is imported or run.

A passage is one docstring paragraph of ordinary sentences: paragraphs with indented lines (code, doctests, field
lists, tables) are left out, as are short ones and ones that are mostly symbols. Exact duplicates (docstrings
copied between modules) are kept once. The order is fixed (files by path, then as written), so a run is
reproducible on the same Python version.
"""

import ast
import logging
import platform
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STDLIB_LICENSE", "ProsePassage", "reconstruction_record", "reconstruction_row", "stdlib_docstring_passages"]

logger = logging.getLogger(__name__)

STDLIB_LICENSE = "PSF-2.0"
# Test suites are code fixtures, not prose; site-packages is not the standard library.
SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
MIN_WORD_SHARE = 0.75  # share of a paragraph's words that are plain words (letters only), so formulas and paths drop


@dataclass(frozen=True)
class ProsePassage:
    text: str
    source: str  # where it was read: "cpython-3.11.7/Lib/shelve.py:Shelf" (another root: "<its name>/<path>")
    license: str


def _paragraphs(docstring: str) -> list[str]:
    paragraphs = []
    for block in re.split(r"\n\s*\n", docstring):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(line.startswith((" ", "\t")) or line.startswith(">>>") for line in lines):
            continue
        paragraphs.append(" ".join(" ".join(lines).split()))
    return paragraphs


def _is_prose(paragraph: str, min_words: int) -> bool:
    words = paragraph.split()
    return len(words) >= min_words and sum(w.strip(".,;:()'\"!?").isalpha() for w in words) >= MIN_WORD_SHARE * len(words)


def stdlib_docstring_passages(min_words: int = 40, root: str | Path | None = None) -> list[ProsePassage]:
    """Every prose paragraph of at least `min_words` words in the docstrings (modules, classes, functions) of the
    standard library at `root` (default: this interpreter's). Files that do not parse are skipped and counted."""
    if min_words < 1:
        raise ValueError(f"min_words must be >= 1, got {min_words}.")
    default_root = root is None
    root = Path(sysconfig.get_paths()["stdlib"] if default_root else root)
    if not root.is_dir():
        raise FileNotFoundError(f"No standard library folder at {root}.")
    label = f"{platform.python_implementation().lower()}-{platform.python_version()}/Lib" if default_root else root.name
    passages, seen, unreadable = [], set(), 0
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_FOLDERS & set(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            unreadable += 1
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            docstring = ast.get_docstring(node)
            for paragraph in _paragraphs(docstring or ""):
                if paragraph in seen or not _is_prose(paragraph, min_words):
                    continue
                seen.add(paragraph)
                where = path.relative_to(root).as_posix() + (f":{node.name}" if hasattr(node, "name") else "")
                passages.append(ProsePassage(paragraph, f"{label}/{where}", STDLIB_LICENSE))
    if unreadable:
        logger.warning("%d files under %s did not parse and were skipped.", unreadable, root)
    return passages


def reconstruction_record(text: str) -> dict:
    """The SCP row (the reference format) whose target is the passage itself."""
    return {"data_type": "paraphrase", "question": [], "answers": [text], "docs": [text]}


def reconstruction_row(passage: ProsePassage) -> dict:
    """`reconstruction_record` of a docstring passage, with where it came from."""
    return {**reconstruction_record(passage.text), "source": passage.source, "license": passage.license}
