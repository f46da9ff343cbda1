import gzip
import json
import logging
import re
from pathlib import Path

import pytest

from clara_cli.main import main
from data_synthesis.prose import (
    DICTD_FOLDER,
    PYTHON_DOCS_FOLDER,
    STDLIB_LICENSE,
    _dictd_offset,
    dictd_passages,
    prose_passages,
    python_docs_passages,
    reconstruction_row,
    stdlib_docstring_passages,
)
from testing_utils import dictd_number, write_dictd
from trainers.data import load_rows, validate_row

PROSE = "A shelf is a persistent dictionary whose values can be arbitrary objects that pickle can handle."
CLASS_PROSE = "The lock is released when the block ends, even when the block raises an exception."
FUNCTION_PROSE = "Return the number of items that the container holds at the moment of the call."


@pytest.fixture
def stdlib(tmp_path):
    """A standard library folder with one of each kind of paragraph that must be kept or left out."""
    root = tmp_path / "Lib"
    (root / "pkg").mkdir(parents=True)
    (root / "test").mkdir()
    (root / "alpha.py").write_text(f'''"""Short title.

{" ".join(PROSE.split()[:8])}
{" ".join(PROSE.split()[8:])}

    indented = code(that, is, not, prose, at, all, even, if, long)

>>> example(that, looks, like, a, doctest, and, is, long, enough)

The doctest below is not prose even though this line reads like a sentence of ordinary words.
>>> pass_it()
"""


class Lock:
    """{CLASS_PROSE}"""

    def copy(self):
        """{PROSE}"""
''')
    (root / "pkg" / "beta.py").write_text(f'''def size():
    """{FUNCTION_PROSE}

    /usr/lib/x.so /usr/lib/y.so /usr/lib/z.so 0x1f 0x2f 0x3f 0x4f 0x5f 0x6f
    """


async def fetch():
    """/usr/lib/x.so /usr/lib/y.so /usr/lib/z.so 0x1f 0x2f 0x3f 0x4f 0x5f 0x6f 0x7f"""
''')
    (root / "test" / "test_alpha.py").write_text(f'"""{FUNCTION_PROSE} In a test."""\n')
    (root / "broken.py").write_text('def broken(:\n    """Never read."""\n')
    return root


def test_stdlib_passages_are_the_prose_paragraphs_once_each_in_file_order(stdlib, caplog):
    with caplog.at_level(logging.WARNING, logger="data_synthesis.prose"):
        passages = stdlib_docstring_passages(min_words=8, root=stdlib)
    assert [(p.text, p.source) for p in passages] == [
        (PROSE, "Lib/alpha.py"),  # the two lines joined; the title, code and doctest left out; the copy kept once
        (CLASS_PROSE, "Lib/alpha.py:Lock"),
        (FUNCTION_PROSE, "Lib/pkg/beta.py:size"),  # the path-and-number paragraphs left out, tests skipped
    ]
    assert {p.license for p in passages} == {STDLIB_LICENSE}
    assert "1 files under" in caplog.text and "did not parse" in caplog.text
    longest = [p.text for p in stdlib_docstring_passages(min_words=16, root=stdlib)]
    assert longest == [PROSE] and len(PROSE.split()) == 16 and len(CLASS_PROSE.split()) == 15


def test_stdlib_passages_refuse_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="min_words"):
        stdlib_docstring_passages(min_words=0, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="No standard library folder"):
        stdlib_docstring_passages(root=tmp_path / "missing")


def test_reconstruction_rows_are_valid_scp_rows_whose_target_is_the_passage(stdlib):
    passage = stdlib_docstring_passages(min_words=8, root=stdlib)[0]
    row = reconstruction_row(passage)
    assert validate_row(row, "scp") == {"data_type": "paraphrase", "questions": [], "answers": [PROSE], "document": PROSE}
    assert (row["source"], row["license"]) == ("Lib/alpha.py", "PSF-2.0")


def test_clara_prose_writes_rows_that_stage_1_reads(stdlib, tmp_path, capsys):
    output = tmp_path / "prose.jsonl"
    assert main(["prose", "--output", str(output), "--root", str(stdlib), "--min_words", "8", "--limit", "2"]) == 0
    assert "Wrote 2 passages (31 words)" in capsys.readouterr().out
    assert [row["document"] for row in load_rows(output, "scp")] == [PROSE, CLASS_PROSE]
    assert json.loads(output.read_text().splitlines()[1])["source"] == "Lib/alpha.py:Lock"
    with pytest.raises(SystemExit, match="--limit"):
        main(["prose", "--output", str(output), "--limit", "0"])
    with pytest.raises(SystemExit, match=r"Unknown --source 'wikipedia'; choose from \['stdlib', 'foldoc', 'jargon', 'python-docs'\]"):
        main(["prose", "--output", str(output), "--source", "wikipedia"])


@pytest.mark.slow
def test_this_pythons_standard_library_gives_a_thousand_prose_passages():
    passages = stdlib_docstring_passages()
    assert len(passages) > 500 and len({p.text for p in passages}) == len(passages)
    assert all(len(p.text.split()) >= 40 and "/Lib/" in p.source for p in passages)


# ---------------------------------------------------------------- dictd databases (FOLDOC, the Jargon File)
# Debian's packages, or scripts/get_debian_prose.sh's copy of them (CI runs it).
DEBIAN_DICTD = next(
    (folder for folder in (Path(DICTD_FOLDER), Path(__file__).resolve().parents[1] / ".cache" / "debian_prose")
     if (folder / "foldoc.index").is_file() and (folder / "jargon.index").is_file()),
    None,
)
ANDREW = """Andrew Project
Andrew

   <project> A distributed system project for support of
   educational and research computing at {Carnegie Mellon
   University}, named after Andrew Carnegie, who provided
   money to establish {CMU (http://www.cmu.edu/)}.

   See also {Andrew File System}, {class}.

   {Home FTP (ftp://emsworth.andrew.cmu.edu)}.

   {Usenet} newsgroup: {news:comp.soft-sys.andrew}.

   [More detail?]

   (1997-11-17)

"""
ENDIAN = """big-endian

   1. <data, architecture> The __most__ significant byte has the
   lowest address, as in the {IBM 370} family (Mike Sendall
   <sendall@dxpt01.cern.ch>).  2. <networking> A backward mail address.

      int x = 1; /* code is not prose */

   (2003-01-14)

"""
PRIESTHOOD = """priesthood
 n.

    [TMRC; obs.] The select group of system managers responsible for the
    operation of a batch computer system.

"""
SHORT = """nybble

   Half a byte.

"""


def test_dictd_numbers_are_read_as_dictd_writes_them():
    numbers, digits = [0, 63, 64, 4096, 4097, 2408824], ["A", "/", "BA", "BAA", "BAB", "JMF4"]
    assert [_dictd_offset(field) for field in digits] == numbers
    assert [dictd_number(number) for number in numbers] == digits  # the helper that writes the test databases


@pytest.mark.parametrize("compress", [True, False])
def test_dictd_passages_are_each_entrys_title_and_prose_once(tmp_path, compress):
    entries = [
        (["00-database-info"], "This file was converted from the original database on Thu Jan 19 2023 by dictfmt.\n"),
        (["Andrew Project", "Andrew"], ANDREW),  # two headwords, one entry
        (["big-endian"], ENDIAN),
        (["nybble"], SHORT),
        (["priesthood"], PRIESTHOOD),
        (["priesthood (copy)"], PRIESTHOOD),  # the same text at another offset
    ]
    folder = write_dictd(tmp_path / "dictd", "foldoc", entries, compress)
    passages = dictd_passages("foldoc", min_words=10, root=folder)
    assert [(p.text, p.source) for p in passages] == [
        ("Andrew Project: A distributed system project for support of educational and research computing at Carnegie "
         "Mellon University, named after Andrew Carnegie, who provided money to establish CMU.",
         "dict-foldoc/foldoc:Andrew Project"),
        ("big-endian: 1. The most significant byte has the lowest address, as in the IBM 370 family (Mike Sendall). "
         "2. A backward mail address.", "dict-foldoc/foldoc:big-endian"),
        ("priesthood: [TMRC; obs.] The select group of system managers responsible for the operation of a batch "
         "computer system.", "dict-foldoc/foldoc:priesthood"),
    ]
    assert {p.license for p in passages} == {"GFDL-1.1-or-later"}
    # The headword does not count: Andrew's prose has 25 words, big-endian's 22.
    assert [p.text for p in prose_passages("foldoc", min_words=23, root=folder)] == [passages[0].text]
    row = reconstruction_row(passages[2])
    assert validate_row(row, "scp")["document"] == passages[2].text and row["license"] == "GFDL-1.1-or-later"


def test_dictd_passages_name_what_is_missing_or_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No dictd database 'jargon' in .*apt-get install dict-jargon"):
        dictd_passages("jargon", root=tmp_path)
    folder = write_dictd(tmp_path / "dictd", "jargon", [(["priesthood"], PRIESTHOOD)])
    assert [p.license for p in dictd_passages("jargon", min_words=5, root=folder)] == ["public-domain"]
    valid_index = (folder / "jargon.index").read_text()
    (folder / "jargon.index").write_text(valid_index + "broken line without offsets\n")
    with pytest.raises(ValueError, match=r"jargon.index:2: not a dictd index line"):
        dictd_passages("jargon", root=folder)
    (folder / "jargon.index").write_text("priesthood\tA\tZZZ\n")
    with pytest.raises(ValueError, match=r"jargon.index:1: entry 'priesthood' ends past the end of .*jargon.dict.dz"):
        dictd_passages("jargon", root=folder)
    (folder / "jargon.dict.dz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"jargon.dict.dz: not a readable dictd data file"):
        dictd_passages("jargon", root=folder)
    with pytest.raises(ValueError, match="min_words"):
        dictd_passages("jargon", min_words=0, root=folder)
    with pytest.raises(ValueError, match="Unknown dictd prose source 'devil'"):
        dictd_passages("devil", root=folder)
    with pytest.raises(ValueError, match="Unknown prose source 'devil'"):
        prose_passages("devil", root=folder)


def test_clara_prose_writes_foldoc_rows(tmp_path, capsys):
    folder = write_dictd(tmp_path / "dictd", "foldoc", [(["Andrew Project"], ANDREW), (["big-endian"], ENDIAN)])
    output = tmp_path / "foldoc.jsonl"
    arguments = ["prose", "--output", str(output), "--source", "foldoc", "--root", str(folder), "--min_words", "5"]
    assert main(arguments) == 0
    assert "Wrote 2 passages (50 words) of foldoc prose" in capsys.readouterr().out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["source"] for row in rows] == ["dict-foldoc/foldoc:Andrew Project", "dict-foldoc/foldoc:big-endian"]


@pytest.mark.skipif(DEBIAN_DICTD is None, reason="Debian's dict-foldoc and dict-jargon (scripts/get_debian_prose.sh)")
def test_debians_foldoc_and_jargon_file_give_thousands_of_clean_passages():
    for source, least in (("foldoc", 4000), ("jargon", 1000)):
        passages = prose_passages(source, root=DEBIAN_DICTD)
        assert len(passages) > least and len({p.text for p in passages}) == len(passages)
        assert all(len(p.text.split()) >= 40 for p in passages)
        # The markup is resolved: no domain tags or emphasis left, link braces only where the source's are unbalanced
        # (8 of FOLDOC's entries and 3 of the Jargon File's in 2023), and each passage starts with its entry's title.
        assert not [p.source for p in passages if re.search(r"(: |\d\. )<[a-z, ]+>", p.text) or "__" in p.text]
        assert sum("{" in p.text or "}" in p.text for p in passages) < 0.01 * len(passages)
        assert all(p.text.startswith(p.source.partition(":")[2] + ": ") for p in passages)


# ---------------------------------------------------------------- Python's documentation

PATH_MODULE = """:mod:`os.path` --- Common pathname manipulations
================================================

.. module:: os.path
   :synopsis: Operations on pathnames.

.. index:: single: path; operations

--------------

This module implements some useful functions on pathnames. To read or write
files see :func:`open`, and for accessing the filesystem see the :mod:`os`
module.  Python does not do any *automatic* path expansions, see ``glob``::

   >>> import glob
   >>> glob.glob("*.txt")

.. note::

   All of these functions accept either only bytes or only string objects as
   their parameters, and return an object of the same type.

.. seealso:: The :mod:`pathlib` module offers high-level path objects.

* :mod:`posixpath` for UNIX-style paths
* :mod:`ntpath` for Windows paths

.. function:: join(path, *paths, \\
                   strict=False)

   Join one or more path segments intelligently, as described in :pep:`8 <8>`
   and :issue:`1234`.  The return value is the concatenation of *path* and all
   members of **\\*paths**, with exactly one directory separator.

   .. versionchanged:: 3.6
      Accepts a :term:`path-like object` for *path* and *paths*.

.. class:: PurePath(*pathsegments)

   A generic class that represents the system's path flavour, whichever
   system it is run on, and that never touches the filesystem at all.

   .. method:: match(pattern)

      Match this path against the provided glob-style pattern and return
      whether matching was successful or not.

.. This comment is not shown although it is long enough to count as prose here.

=========  ==========================================================
Operation  What it returns to the caller of the function in the module
=========  ==========================================================
"""

TUTORIAL = """**************************
  Whetting Your Appetite
**************************

If you do much work on computers, eventually you find that there's some task you'd like to automate.

Perhaps you'd like to write a small custom search-and-replace program, or a game, or a quick script.

Python is just the language for you, and it runs on Windows, macOS and Unix operating systems.
"""


@pytest.fixture
def python_docs(tmp_path):
    """A documentation sources folder as Debian's python3-doc installs it, one file gzipped as get_debian_prose.sh
    stores it."""
    root = tmp_path / "_sources"
    (root / "library").mkdir(parents=True)
    (root / "library" / "os.path.rst.txt").write_text(PATH_MODULE)
    (root / "tutorial").mkdir()
    with gzip.open(root / "tutorial" / "appetite.rst.txt.gz", "wt") as file:
        file.write(TUTORIAL + "\nThe Glossary\n============\n\n" + TUTORIAL.split("\n\n", 2)[2])  # its last two
    return root


def test_python_docs_passages_are_titled_sections_and_descriptions_without_markup(python_docs):
    passages = python_docs_passages(min_words=8, root=python_docs, max_words=40)
    assert [(p.source, p.text) for p in passages] == [
        # Paragraphs of 34, 24 and 7 words (two notes): at most 40 words of prose per passage, each titled.
        ("python-docs/library/os.path.rst.txt:os.path - Common pathname manipulations",
         "os.path - Common pathname manipulations: This module implements some useful functions on pathnames. To read "
         "or write files see open, and for accessing the filesystem see the os module. Python does not do any automatic "
         "path expansions, see glob:"),
        ("python-docs/library/os.path.rst.txt:os.path - Common pathname manipulations",
         "os.path - Common pathname manipulations: All of these functions accept either only bytes or only string "
         "objects as their parameters, and return an object of the same type. The pathlib module offers high-level "
         "path objects."),
        # A description: titled by what it describes, in its module; its signature's two lines joined; a longer
        # passage than 40 words, as the paragraph itself is.
        ("python-docs/library/os.path.rst.txt:os.path.join(path, *paths, strict=False)",
         "os.path.join(path, *paths, strict=False): Join one or more path segments intelligently, as described in 8 "
         "and bpo-1234. The return value is the concatenation of path and all members of *paths, with exactly one "
         "directory separator. Accepts a path-like object for path and paths."),
        ("python-docs/library/os.path.rst.txt:os.path.PurePath(*pathsegments)",
         "os.path.PurePath(*pathsegments): A generic class that represents the system's path flavour, whichever system "
         "it is run on, and that never touches the filesystem at all."),
        ("python-docs/library/os.path.rst.txt:os.path.PurePath.match(pattern)",
         "os.path.PurePath.match(pattern): Match this path against the provided glob-style pattern and return whether "
         "matching was successful or not."),
        ("python-docs/tutorial/appetite.rst.txt:Whetting Your Appetite",
         "Whetting Your Appetite: If you do much work on computers, eventually you find that there's some task you'd "
         "like to automate. Perhaps you'd like to write a small custom search-and-replace program, or a game, or a "
         "quick script."),
        ("python-docs/tutorial/appetite.rst.txt:Whetting Your Appetite",
         "Whetting Your Appetite: Python is just the language for you, and it runs on Windows, macOS and Unix operating "
         "systems."),
        # The same paragraphs under another title are another passage. The code, the list, the comment, the index
        # entry, the module's options, the transition and the table are left out everywhere.
        ("python-docs/tutorial/appetite.rst.txt:The Glossary",
         "The Glossary: Perhaps you'd like to write a small custom search-and-replace program, or a game, or a quick "
         "script. Python is just the language for you, and it runs on Windows, macOS and Unix operating systems."),
    ]
    assert {p.license for p in passages} == {"PSF-2.0"}
    # Passages under min_words words of prose are left out (the title does not count).
    longest = [p.text for p in python_docs_passages(min_words=35, root=python_docs, max_words=40)]
    assert longest == [p.text for p in passages if len(p.text.partition(": ")[2].split()) >= 35] == [
        passages[i].text for i in (2, 5)  # of 39 and 36 words; the first and the last passage's 34 are too few
    ]
    # With the default of about 180 words, the module's two paragraphs are one passage.
    assert prose_passages("python-docs", min_words=8, root=python_docs)[0].text == (
        passages[0].text + " " + passages[1].text.partition(": ")[2]
    )


def test_python_docs_passages_name_what_is_missing_or_malformed(python_docs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No documentation sources .* under .*apt-get install python3-doc"):
        python_docs_passages(root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="max_words"):
        python_docs_passages(min_words=50, max_words=40, root=python_docs)
    (python_docs / "library" / "broken.rst.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"broken.rst.txt.gz: not a readable documentation source"):
        python_docs_passages(root=python_docs)


PYTHON_DOCS = next(
    (folder for folder in (Path(PYTHON_DOCS_FOLDER), Path(__file__).resolve().parents[1] / ".cache" / "debian_prose" / "python-docs")
     if folder.is_dir()),
    None,
)


@pytest.mark.skipif(PYTHON_DOCS is None, reason="Debian's python3-doc (scripts/get_debian_prose.sh)")
def test_debians_python_documentation_gives_thousands_of_clean_passages():
    passages = prose_passages("python-docs", root=PYTHON_DOCS)
    assert len(passages) > 5000 and len({p.text for p in passages}) == len(passages)
    assert all(len(p.text.split()) >= 40 for p in passages)
    assert {p.source.split("/")[1] for p in passages} >= {"library", "reference", "tutorial", "howto", "faq"}
    # The markup is resolved: no roles, literals or directives left; every passage starts with its title.
    assert not [p.source for p in passages if re.search(r":[\w-]+:`|``|^\.\. |\n\.\. ", p.text)]
    assert sum("`" in p.text for p in passages) < 0.002 * len(passages)  # backquotes the sources hold unbalanced
    assert all(p.text.startswith(p.source.partition(":")[2] + ": ") for p in passages)
