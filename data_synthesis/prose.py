"""Real English prose for stage-1 reconstruction pretraining without a download, from four sources:

- `stdlib`: the docstrings of CPython's standard library, which every Python installation ships (Python Software
  Foundation License 2.0, which allows use, copying and derived works with its notice kept). Files are parsed with
  `ast`, so nothing is imported or run. A passage is one docstring paragraph.
- `foldoc`: the Free On-line Dictionary of Computing (editor Denis Howe; GNU FDL 1.1 or later, no invariant
  sections), about 12,000 encyclopedic entries on computing's languages, machines, people and institutions, as
  Debian's `dict-foldoc` package installs it (`apt-get install dict-foldoc`).
- `jargon`: the Jargon File 4.4.7 (public domain), as Debian's `dict-jargon` package installs it.
- `python-docs`: Python's documentation (the tutorial, the library and language references, the HOWTOs, the FAQs;
  Python Software Foundation License 2.0), from the reStructuredText sources that Debian's `python3-doc` package
  installs beside the HTML (`/usr/share/doc/python3/html/_sources`, files `*.rst.txt`, also gzipped).

FOLDOC and the Jargon File are dictd databases (`NAME.index` beside `NAME.dict.dz` or `NAME.dict`); a passage is one
entry, its title then its prose paragraphs. In the documentation a passage is a section's or a described object's
title, then its prose paragraphs up to about `max_words` words (a longer section gives several passages); comments,
code, tables, lists and directives other than descriptions and notes are left out, and the inline markup is resolved
to its text. Everywhere paragraphs with indented lines (code, doctests, tables, verse) are
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
    "PYTHON_DOCS_FOLDER",
    "STDLIB_LICENSE",
    "ProsePassage",
    "check_prose_source",
    "dictd_passages",
    "prose_passages",
    "python_docs_passages",
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
PYTHON_DOCS_FOLDER = "/usr/share/doc/python3/html/_sources"  # where Debian's python3-doc puts the documentation's sources
PROSE_SOURCES = ("stdlib", *DICTD_SOURCES, "python-docs")
# FOLDOC's markup: "{Cross reference}" and "{text (URL)}" links, "__emphasis__", "<domain, tags>" before each
# sense, and "<mail@address>" after names.
LINK_WITH_ADDRESS = re.compile(r"\{([^{}]*?)\s*\([^(){}]*\)\}")
LINK = re.compile(r"\{([^{}]*)\}")
LINK_ONLY = re.compile(r"^\{[^{}]*\}\.?$")  # a paragraph that is one link ("{Home page (URL)}.")
ANGLE_TAG = re.compile(r"\s*<[^<>]*>")
REFERENCE_LIST = re.compile(r"^(See also|See|Compare)\b")
# reStructuredText: a line of one repeated punctuation character (a title's under- or overline, a transition), and
# lines of punctuation and spaces only (the borders of tables).
RST_LINE = re.compile(r"^([=\-~^*#\"'`+.:_])\1{2,}\s*$")
RST_BORDER = re.compile(r"^[=\-+|\s]+$")
RST_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::\s*(.*)$")
RST_LIST_ITEM = re.compile(r"^([*+-]|#\.|\d+\.|\(?[a-z]\)|:[^:]+:)\s")  # bullets, enumerators, field lists
# Directives whose content is prose, read as its own passages: a description (of a function, class, ...), titled by
# what it describes, or a note inside the current section.
RST_DESCRIPTIONS = {"function", "method", "class", "exception", "attribute", "data", "decorator", "decoratormethod",
                    "classmethod", "staticmethod", "abstractmethod", "coroutinefunction", "coroutinemethod", "describe",
                    "opcode", "option", "cmdoption", "envvar", "pdbcommand", "type", "macro", "member", "var"}
RST_NOTES = {"note", "warning", "seealso", "impl-detail", "versionadded", "versionchanged", "deprecated", "tip",
             "important", "attention", "caution", "hint", "admonition", "topic", "sidebar"}
RST_ROLE = re.compile(r":(?:[\w+.-]+:)?([\w+.-]+):`([^`]*)`")  # ":func:`x`", ":c:func:`x`": the role's last name
RST_REFERENCE = re.compile(r"`([^`]*)`_{0,2}")
RST_LITERAL = re.compile(r"``(.+?)``")
RST_STRONG = re.compile(r"\*\*([^*]+)\*\*")
RST_EMPHASIS = re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])")
RST_FOOTNOTE = re.compile(r"\s*\[(#[\w-]*|\d+|\*)\]_")
PYTHON_DOCS_LICENSE = "PSF-2.0"


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


def _rst_target(role: str, text: str) -> str:
    """What a role or reference shows: "title <target>" -> title; "~a.b.c" -> c; "!name" -> name; an issue number
    as "bpo-N" or "gh-N"."""
    text = re.sub(r"\s*<[^<>]*>$", "", text).strip() if text.endswith(">") and "<" in text else text
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return {"issue": "bpo-", "gh": "gh-"}.get(role, "") + re.sub(r"\\(\S)", r"\1", text.removeprefix("!"))


def _rst_text(text: str) -> str:
    """`text` with reStructuredText's inline markup resolved to what the HTML shows (roughly): literals and roles
    are set aside first, so that the `*` of `**kwargs` in them is not read as emphasis."""
    kept = []

    def keep(shown: str) -> str:
        kept.append(shown)
        return f"\0{len(kept) - 1}\0"

    text = RST_FOOTNOTE.sub("", text)
    text = RST_LITERAL.sub(lambda match: keep(match.group(1)), text)
    text = RST_ROLE.sub(lambda match: keep(_rst_target(match.group(1), match.group(2))), text)
    # Outside literals "\x" is x ("**\*args**" is strong "*args"), and "\ " is nothing.
    text = re.sub(r"\\(\S)", lambda match: keep(match.group(1)), text.replace("\\ ", ""))
    text = RST_REFERENCE.sub(lambda match: _rst_target("", match.group(1)), text)
    text = RST_EMPHASIS.sub(r"\1", RST_STRONG.sub(r"\1", text)).replace(" --- ", " - ")
    text = re.sub(r"\0(\d+)\0", lambda match: kept[int(match.group(1))], text)
    return re.sub(r"\s*::$", ":", text.strip())


def _rst_sections(lines: list[str], title: str, sections: list[tuple[str, list[str]]], names: tuple[str, str]) -> None:
    """Appends `(title, prose paragraphs)` of reStructuredText `lines` to `sections`, in order. A title starts a
    section; a description directive's content is a section titled by what it describes, a note's is read where
    it stands; every other directive, comment and target is left out. `names` is (the current module, the
    enclosing class), which a description's title is qualified with."""
    text, i = [], 0

    def close():
        if text:
            sections.append((title, [_rst_text(p) for p in _paragraphs("\n".join(text))]))
            text.clear()

    while i < len(lines):
        line, following = lines[i], lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and not line[0].isspace() and RST_LINE.match(following) and not RST_LINE.match(line):
            close()  # a title and its underline
            title, i = _rst_text(line), i + 2
            continue
        if RST_LINE.match(line) and following.strip() and i + 2 < len(lines) and lines[i + 2].strip() == line.strip():
            close()  # a title between an overline and an underline, maybe indented
            title, i = _rst_text(following.strip()), i + 3
            continue
        if RST_LINE.match(line):  # a transition, or a title's overline of another length than its underline
            text.append("")
            i += 1
            continue
        if not line.startswith(".."):
            # A paragraph with a table border, or one that opens with a list item, is not running prose.
            text.append("    " + line if RST_BORDER.match(line) or RST_LIST_ITEM.match(line) else line)
            i += 1
            continue
        end = i + 1  # a directive, comment or target: its block is the indented (or blank) lines after it
        while end < len(lines) and (not lines[end].strip() or lines[end][0].isspace()):
            end += 1
        directive = RST_DIRECTIVE.match(line)
        name, argument = directive.groups() if directive else ("", "")
        content = textwrap.dedent("\n".join(lines[i + 1 : end])).splitlines()
        while argument.endswith("\\") and content:  # a signature continued on the next lines
            argument = f"{argument[:-1].rstrip()} {content.pop(0).strip()}"
        while content and (not content[0].strip() or content[0].startswith(":")):  # the directive's options
            content.pop(0)
        if name in ("module", "currentmodule"):
            names = (argument.strip(), "")
        elif name in RST_DESCRIPTIONS and argument:
            close()
            qualified = ".".join(part for part in (*names, argument.strip()) if part)
            inner = (names[0], ".".join(part for part in (names[1], argument.split("(")[0].strip()) if part))
            _rst_sections(content, _rst_text(qualified), sections, inner if name in ("class", "exception") else names)
        elif name in RST_NOTES:
            text.append("")
            # A note's argument is its first line; a version note's is the version.
            text.extend(content if name in ("versionadded", "versionchanged", "deprecated") else [argument, *content])
            text.append("")
        i = end
    close()


def python_docs_passages(min_words: int = 40, root: str | Path | None = None, max_words: int = 180) -> list[ProsePassage]:
    """Passages of Python's documentation from its reStructuredText sources under `root` (default: where Debian's
    python3-doc package puts them, `PYTHON_DOCS_FOLDER`; files `*.rst.txt` or `*.rst.txt.gz`): per section and per
    described object, its title, then its prose paragraphs in passages of at most about `max_words` words (a longer
    paragraph stays whole), each with at least `min_words` words of prose; once each, in file order."""
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"min_words ({min_words}) must be >= 1 and max_words ({max_words}) >= min_words.")
    folder = Path(PYTHON_DOCS_FOLDER if root is None else root)
    paths = sorted(path for pattern in ("*.rst.txt", "*.rst.txt.gz") for path in folder.rglob(pattern))
    if not paths:
        raise FileNotFoundError(
            f"No documentation sources (*.rst.txt or *.rst.txt.gz) under {folder}: install Debian's python3-doc "
            "package (apt-get install python3-doc), run scripts/get_debian_prose.sh, or pass the folder that holds them."
        )
    passages, seen = [], set()
    for path in paths:
        try:
            with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8") as file:
                source = file.read()
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a readable documentation source: {error}") from None
        where = path.relative_to(folder).as_posix().removesuffix(".gz")
        sections = []
        _rst_sections(source.splitlines(), "", sections, ("", ""))
        for title, paragraphs in sections:
            for prose in _word_chunks([p for p in paragraphs if _is_prose(p, 1) and not REFERENCE_LIST.match(p)], max_words):
                passage = f"{title}: {prose}" if title else prose
                if passage not in seen and _is_prose(prose, min_words):
                    seen.add(passage)
                    passages.append(ProsePassage(passage, f"python-docs/{where}:{title}", PYTHON_DOCS_LICENSE))
    return passages


def _word_chunks(paragraphs: list[str], max_words: int):
    """Consecutive paragraphs joined, up to `max_words` words per chunk (a longer paragraph is a chunk of its own)."""
    chunk, words = [], 0
    for paragraph in paragraphs:
        count = len(paragraph.split())
        if chunk and words + count > max_words:
            yield " ".join(chunk)
            chunk, words = [], 0
        chunk.append(paragraph)
        words += count
    if chunk:
        yield " ".join(chunk)


def check_prose_source(source: str, option: str = "prose source") -> None:
    """Raise, naming `option` (the setting that holds `source`), unless `source` is one of `PROSE_SOURCES`."""
    if source not in PROSE_SOURCES:
        raise ValueError(f"Unknown {option} {source!r}; choose from {list(PROSE_SOURCES)}.")


def prose_passages(source: str, min_words: int = 40, root: str | Path | None = None) -> list[ProsePassage]:
    """The passages of one of `PROSE_SOURCES`, read from `root` (default: where Python or Debian put it)."""
    check_prose_source(source)
    if source == "stdlib":
        return stdlib_docstring_passages(min_words, root)
    if source == "python-docs":
        return python_docs_passages(min_words, root)
    return dictd_passages(source, min_words, root)


def reconstruction_record(text: str) -> dict:
    """The SCP row (the reference format) whose target is the passage itself."""
    return {"data_type": "paraphrase", "question": [], "answers": [text], "docs": [text]}


def reconstruction_row(passage: ProsePassage) -> dict:
    """`reconstruction_record` of a prose passage, with where it came from and its license."""
    return {**reconstruction_record(passage.text), "source": passage.source, "license": passage.license}
