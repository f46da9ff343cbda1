"""Real English prose for stage-1 reconstruction pretraining without a download, from three sources:

- `stdlib`: the docstrings of CPython's standard library, which every Python installation ships (Python Software
  Foundation License 2.0, which allows use, copying and derived works with its notice kept). Files are parsed with
  `ast`, so nothing is imported or run. A passage is one docstring paragraph.
- `foldoc`: the Free On-line Dictionary of Computing (editor Denis Howe; GNU FDL 1.1 or later, no invariant
  sections), about 12,000 encyclopedic entries on computing's languages, machines, people and institutions, as
  Debian's `dict-foldoc` package installs it (`apt-get install dict-foldoc`).
- `jargon`: the Jargon File 4.4.7 (public domain), as Debian's `dict-jargon` package installs it.

The last two are dictd databases (`NAME.index` beside `NAME.dict.dz` or `NAME.dict`); a passage is one entry, its
title then its prose paragraphs. Everywhere paragraphs with indented lines (code, doctests, tables, verse) are
left out, as are short passages and ones that are mostly symbols. Exact duplicates are kept once. The order is fixed
(files by path, entries as indexed), so a run is reproducible on the same Python or package version.
"""

import ast
import base64
import gzip
import logging
import platform
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DICTD_SOURCES",
    "PROSE_SOURCES",
    "STDLIB_LICENSE",
    "ProsePassage",
    "check_prose_source",
    "dictd_passages",
    "prose_passages",
    "reconstruction_record",
    "reconstruction_row",
    "stdlib_docstring_passages",
]

logger = logging.getLogger(__name__)

STDLIB_LICENSE = "PSF-2.0"
# Test suites are code fixtures, not prose; site-packages is not the standard library.
SKIPPED_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
MIN_WORD_SHARE = 0.75  # share of a paragraph's words that are plain words (letters only), so formulas and paths drop
DICTD_FOLDER = "/usr/share/dictd"  # where Debian's dict-* packages install their databases
# Source name -> (the Debian package that installs its dictd database of that name, the text's license).
DICTD_SOURCES = {"foldoc": ("dict-foldoc", "GFDL-1.1-or-later"), "jargon": ("dict-jargon", "public-domain")}
PROSE_SOURCES = ("stdlib", *DICTD_SOURCES)
# FOLDOC's markup: "{Cross reference}" and "{text (URL)}" links, "__emphasis__", "<domain, tags>" before each
# sense, and "<mail@address>" after names.
LINK_WITH_ADDRESS = re.compile(r"\{([^{}]*?)\s*\([^(){}]*\)\}")
LINK = re.compile(r"\{([^{}]*)\}")
LINK_ONLY = re.compile(r"^\{[^{}]*\}\.?$")  # a paragraph that is one link ("{Home page (URL)}.")
ANGLE_TAG = re.compile(r"\s*<[^<>]*>")
REFERENCE_LIST = re.compile(r"^(See also|See|Compare)\b")


@dataclass(frozen=True)
class ProsePassage:
    text: str
    # Where it was read: "cpython-3.11.7/Lib/shelve.py:Shelf" (another root: "<its name>/<path>"), or
    # "dict-foldoc/foldoc:<the entry's title>".
    source: str
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


def _dictd_offset(field: str) -> int:
    """A dictd index number: base64 digits, most significant first, without padding."""
    return int.from_bytes(base64.b64decode("A" * (-len(field) % 4) + field), "big")


def _entry_paragraphs(body: str) -> list[str]:
    """The prose paragraphs of one entry's body, its markup resolved; links alone, reference lists, notes and dates
    left out."""
    paragraphs = []
    for paragraph in _paragraphs(textwrap.dedent(body)):
        if LINK_ONLY.match(paragraph):
            continue
        paragraph = ANGLE_TAG.sub("", paragraph).replace("__", "")
        paragraph = LINK.sub(r"\1", LINK_WITH_ADDRESS.sub(r"\1", paragraph)).strip()
        if paragraph and not REFERENCE_LIST.match(paragraph) and _is_prose(paragraph, 1):
            paragraphs.append(paragraph)
    return paragraphs


def dictd_passages(source: str, min_words: int = 40, root: str | Path | None = None) -> list[ProsePassage]:
    """Every entry of at least `min_words` words of prose in the dictd database `source` (a key of `DICTD_SOURCES`)
    under `root` (default: Debian's /usr/share/dictd): `"<title>: <its prose paragraphs>"`, once each."""
    if source not in DICTD_SOURCES:
        raise ValueError(f"Unknown dictd prose source {source!r}; choose from {sorted(DICTD_SOURCES)}.")
    if min_words < 1:
        raise ValueError(f"min_words must be >= 1, got {min_words}.")
    package, license = DICTD_SOURCES[source]
    folder = Path(DICTD_FOLDER if root is None else root)
    index = folder / f"{source}.index"
    data = next((path for path in (folder / f"{source}.dict.dz", folder / f"{source}.dict") if path.is_file()), None)
    if not index.is_file() or data is None:
        raise FileNotFoundError(
            f"No dictd database {source!r} in {folder} (it needs {source}.index and {source}.dict.dz or .dict): install "
            f"Debian's {package} package (apt-get install {package}) or pass the folder that holds it."
        )
    try:
        with gzip.open(data) if data.suffix == ".dz" else open(data, "rb") as file:  # dictzip files are gzip files
            text = file.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"{data}: not a readable dictd data file: {error}") from None
    passages, seen_entries, seen_texts = [], set(), set()
    for line_number, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        try:
            headword, start, length = fields[0], _dictd_offset(fields[1]), _dictd_offset(fields[2])
        except (IndexError, ValueError) as error:
            raise ValueError(f"{index}:{line_number}: not a dictd index line (headword, offset, length): {error}") from None
        # Several headwords (aliases) can index one entry; the database's own "00-database-*" entries are not prose.
        if headword.startswith(("00-database", "00database")) or (start, length) in seen_entries:
            continue
        if start + length > len(text):
            raise ValueError(f"{index}:{line_number}: entry {headword!r} ends past the end of {data} (another version?).")
        seen_entries.add((start, length))
        entry = text[start : start + length].decode("utf-8", errors="replace")
        head, _, body = entry.strip("\n").partition("\n\n")
        title = head.splitlines()[0].strip()  # the entry's own name; the headwords are it and its aliases
        prose = " ".join(_entry_paragraphs(body))
        passage = f"{title}: {prose}"
        if prose and passage not in seen_texts and _is_prose(prose, min_words):
            seen_texts.add(passage)
            passages.append(ProsePassage(passage, f"{package}/{source}:{title}", license))
    return passages


def check_prose_source(source: str, option: str = "prose source") -> None:
    """Raise, naming `option` (the setting that holds `source`), unless `source` is one of `PROSE_SOURCES`."""
    if source not in PROSE_SOURCES:
        raise ValueError(f"Unknown {option} {source!r}; choose from {list(PROSE_SOURCES)}.")


def prose_passages(source: str, min_words: int = 40, root: str | Path | None = None) -> list[ProsePassage]:
    """The passages of one of `PROSE_SOURCES`, read from `root` (default: where Python or Debian put it)."""
    check_prose_source(source)
    if source == "stdlib":
        return stdlib_docstring_passages(min_words, root)
    return dictd_passages(source, min_words, root)


def reconstruction_record(text: str) -> dict:
    """The SCP row (the reference format) whose target is the passage itself."""
    return {"data_type": "paraphrase", "question": [], "answers": [text], "docs": [text]}


def reconstruction_row(passage: ProsePassage) -> dict:
    """`reconstruction_record` of a prose passage, with where it came from and its license."""
    return {**reconstruction_record(passage.text), "source": passage.source, "license": passage.license}
