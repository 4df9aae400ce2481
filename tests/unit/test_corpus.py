"""Search-R1 jsonl corpus reading: title/text parsing, both line layouts, bad lines with line numbers."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from igpo.retriever.corpus import CorpusFormatError, iter_corpus, parse_contents
from igpo.types import Doc

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny_corpus.jsonl"


@pytest.mark.parametrize(
    "contents, expected",
    [
        ('"Paris"\nParis is the capital of France.', ("Paris", "Paris is the capital of France.")),
        ('"Python (language)"\nline one\nline two', ("Python (language)", "line one\nline two")),
        ("Paris\nunquoted first line is the title", ("Paris", "unquoted first line is the title")),
        ('"Only a title"', ("Only a title", "")),
        ("no newline at all", ("", "no newline at all")),
        ('"Quote" inside"\nbody', ('Quote" inside', "body")),
        ('""\nbody with empty title', ("", "body with empty title")),
    ],
)
def test_parse_contents(contents: str, expected: tuple[str, str]) -> None:
    assert parse_contents(contents) == expected


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_iter_corpus_reads_both_layouts_and_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", [
        json.dumps({"id": "a", "contents": '"Alpha"\nfirst doc'}),
        "",
        json.dumps({"id": 7, "title": "Beta", "text": "second doc"}),
        json.dumps({"id": "c", "text": "no title field"}),
    ])
    assert list(iter_corpus(path)) == [
        Doc(id="a", title="Alpha", text="first doc"),
        Doc(id="7", title="Beta", text="second doc"),
        Doc(id="c", title="", text="no title field"),
    ]


def test_fixture_corpus_parses() -> None:
    docs = list(iter_corpus(FIXTURE))
    assert len(docs) == 30
    assert docs[0] == Doc(id="0", title="Ada Lovelace", text=docs[0].text)
    assert docs[0].text.startswith("Ada Lovelace was an English mathematician")
    assert docs[3].title == "Alan Turing"  # the one line in title/text layout
    assert len({d.id for d in docs}) == 30


def test_gzip_corpus(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "z", "contents": '"Zed"\nzipped'}) + "\n")
    assert list(iter_corpus(path)) == [Doc(id="z", title="Zed", text="zipped")]


BAD_LINES = [
    ("{not json", "invalid JSON"),
    (json.dumps({"contents": '"T"\nx'}), "'id'"),
    (json.dumps({"id": "", "contents": '"T"\nx'}), "'id'"),
    (json.dumps({"id": "x"}), "missing 'contents'"),
    (json.dumps({"id": "x", "contents": 3}), "'contents' must be a string"),
    (json.dumps(["id", "x"]), "expected a JSON object"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_bad_line_raises_with_file_and_line(tmp_path: Path, bad: str, reason: str) -> None:
    path = _write(tmp_path / "c.jsonl", [json.dumps({"id": "1", "contents": '"A"\na'}), "", bad])
    with pytest.raises(CorpusFormatError) as info:
        list(iter_corpus(path))
    err = info.value
    assert err.line == 3 and err.path == str(path)
    assert f"{path}: line 3:" in str(err) and reason in str(err)


def test_skip_mode_counts_bad_lines(tmp_path: Path) -> None:
    lines = [json.dumps({"id": str(i), "contents": f'"T{i}"\ntext {i}'}) for i in range(5)]
    lines[1], lines[3] = "{broken", json.dumps({"id": "3"})
    path = _write(tmp_path / "c.jsonl", lines)
    errors: list[CorpusFormatError] = []
    docs = list(iter_corpus(path, on_error="skip", errors=errors))
    assert [d.id for d in docs] == ["0", "2", "4"]
    assert [e.line for e in errors] == [2, 4]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(iter_corpus(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="on_error"):
        list(iter_corpus(FIXTURE, on_error="ignore"))  # type: ignore[arg-type]
