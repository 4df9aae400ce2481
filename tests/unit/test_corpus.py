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


def test_invalid_utf8_is_a_bad_line_with_its_number(tmp_path: Path) -> None:
    good = json.dumps({"id": "1", "contents": '"A"\na'}).encode()
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + b'{"id": "2", "contents": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(CorpusFormatError, match=r"line 2: invalid UTF-8 at byte 28") as info:
        list(iter_corpus(path))
    assert info.value.line == 2
    errors: list[CorpusFormatError] = []
    assert [d.id for d in iter_corpus(path, on_error="skip", errors=errors)] == ["1", "1"]  # BOM line 1 reads
    assert [e.line for e in errors] == [2]
    gz = tmp_path / "c.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(good + b"\n\xff\xfe\n")
    with pytest.raises(CorpusFormatError, match="line 2: invalid UTF-8"):
        list(iter_corpus(gz))


def test_a_corpus_of_bad_lines_only_leaves_nothing_in_skip_mode(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jsonl", ["{", "[]", json.dumps({"id": "x"})])
    errors: list[CorpusFormatError] = []
    assert list(iter_corpus(path, on_error="skip", errors=errors)) == []
    assert [e.line for e in errors] == [1, 2, 3]


# ---- a retriever that returns nothing: the episode goes on with a "No results." observation --------------
class _EmptyRetriever:
    def setup(self) -> None: ...

    def close(self) -> None: ...

    def search_batch(self, queries: list[str], k: int) -> list[list[Doc]]:
        return [[] for _ in queries]


def test_empty_search_results_become_a_no_results_observation(tiny_tokenizer) -> None:
    from igpo.generator.base import SamplingConfig
    from igpo.prompts import ChatPieces, encode
    from igpo.rollout import RolloutConfig, RolloutRunner
    from igpo.types import Question
    from tests.unit.test_rollout import ScriptedGenerator

    search, answer = "<think>t</think><search>xyzzy plugh</search>", "<think>t</think><answer>a</answer>"
    runner = RolloutRunner(ScriptedGenerator(tiny_tokenizer, [search, answer]), _EmptyRetriever(), tiny_tokenizer,
                           config=RolloutConfig(max_turns=3))
    episodes, stats = runner.run([Question("q", "Where?", ["a"])], group_size=2, sampling=SamplingConfig())
    pieces = ChatPieces.from_tokenizer(tiny_tokenizer)
    expected = encode(tiny_tokenizer, f"{pieces.assistant_end}{pieces.user_open}<information>No results."
                                      f"</information>{pieces.user_close}")
    for ep in episodes:
        assert ep.finish == "answer" and ep.turns[0].docs == [] and ep.turns[0].obs_ids == expected
    assert stats.searches == 2 and stats.search_failures == 0
