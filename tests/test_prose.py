import json
import logging

import pytest

from clara_cli.main import main
from data_synthesis.prose import STDLIB_LICENSE, reconstruction_row, stdlib_docstring_passages
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
    assert main(["prose", "--output", str(output), "--stdlib", str(stdlib), "--min_words", "8", "--limit", "2"]) == 0
    assert "Wrote 2 passages (31 words)" in capsys.readouterr().out
    assert [row["document"] for row in load_rows(output, "scp")] == [PROSE, CLASS_PROSE]
    assert json.loads(output.read_text().splitlines()[1])["source"] == "Lib/alpha.py:Lock"
    with pytest.raises(SystemExit, match="--limit"):
        main(["prose", "--output", str(output), "--limit", "0"])


@pytest.mark.slow
def test_this_pythons_standard_library_gives_a_thousand_prose_passages():
    passages = stdlib_docstring_passages()
    assert len(passages) > 500 and len({p.text for p in passages}) == len(passages)
    assert all(len(p.text.split()) >= 40 and "/Lib/" in p.source for p in passages)
