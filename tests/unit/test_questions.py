"""Question loaders: IGPO parquet (exact schema of the IGPO eval file), Search-R1 parquet, jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from igpo.data import load_questions
from igpo.data.questions import extract_question, group_by_source

# The schema of IGPO's eval parquet (data_source, prompt, ability, reward_model, extra_info), as written
# by verl's preprocessing: every field a string, aliases joined by <|answer_split|>.
IGPO_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
    ("extra_info", pa.struct([("index", pa.string()), ("split", pa.string())])),
])


def igpo_row(source: str, idx: str, question: str, truth: str, split: str = "dev") -> dict[str, Any]:
    return {"data_source": source, "prompt": [{"content": question, "role": "user"}],
            "ability": "search & question answering",
            "reward_model": {"ground_truth": truth, "style": "unknown"},
            "extra_info": {"index": idx, "split": split}}


def write_igpo(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=IGPO_SCHEMA), path)
    return path


def many_rows() -> list[dict[str, Any]]:
    """Interleaved sources: nq 0..9, tq 0..9, Bamboogle 0..2, in the order nq, tq, nq, tq, ..."""
    rows = []
    for i in range(10):
        rows.append(igpo_row("nq", f"nq_{i}", f"nq question {i}?", f"nq answer {i}"))
        rows.append(igpo_row("tq", f"tq_{i}", f"tq question {i}?", f"tq answer {i}"))
        if i < 3:
            rows.append(igpo_row("Bamboogle", f"Bamboogle_{i}", f"bamboogle question {i}?", f"b{i}"))
    return rows


def test_igpo_parquet_schema_and_fields(tmp_path: Path) -> None:
    path = write_igpo(tmp_path / "q.parquet", [
        igpo_row("2wiki", "2wiki_abc", "What is the date of birth of X's husband?", "20 July 1851"),
        igpo_row("tq", "tq_1", "Creepers?", "minecraft<|answer_split|> mine craft <|answer_split|>"),
    ])
    assert pq.read_schema(path).remove_metadata() == IGPO_SCHEMA
    q0, q1 = load_questions(path)
    assert (q0.id, q0.text, q0.answers, q0.data_source) == (
        "2wiki_abc", "What is the date of birth of X's husband?", ["20 July 1851"], "2wiki")
    assert q0.metadata["extra_info"] == {"index": "2wiki_abc", "split": "dev"}
    assert q0.metadata["row"] == 0 and q0.metadata["ability"] == "search & question answering"
    assert q1.answers == ["minecraft", "mine craft"]  # split, stripped, empty alias dropped


def test_search_r1_parquet_layout(tmp_path: Path) -> None:
    """Search-R1 wraps the question in an instruction and stores {"target": [...]} with integer indices."""
    wrapper = ("Answer the given question. You must conduct reasoning inside <think> and </think> first "
               "every time you get new information. ... For example, <answer> Beijing </answer>. "
               "Question: who wrote the origin of species?\n")
    rows = [{"data_source": "nq", "prompt": [{"role": "system", "content": "sys"},
                                              {"role": "user", "content": wrapper}],
             "reward_model": {"style": "rule", "ground_truth": {"target": ["Charles Darwin", "Darwin"]}},
             "extra_info": {"split": "train", "index": 41}}]
    path = tmp_path / "sr1.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (q,) = load_questions(path, split="train")
    assert (q.id, q.text) == ("41", "who wrote the origin of species?")
    assert q.answers == ["Charles Darwin", "Darwin"]


def test_extract_question() -> None:
    assert extract_question("Instructions... Question: What is 2+2?\n") == "What is 2+2?"
    assert extract_question("  Who painted The Night Watch? ") == "Who painted The Night Watch?"
    assert extract_question("a\nQuestion: first? Question: second") == "first? Question: second"


def test_id_falls_back_to_row_number_and_source_to_unknown(tmp_path: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "reward_model": {"ground_truth": ["a", "b"]}}
            for i in range(3)]
    path = tmp_path / "bare.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    qs = load_questions(path)
    assert [q.id for q in qs] == ["0", "1", "2"]
    assert qs[0].data_source == "unknown" and qs[0].answers == ["a", "b"]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join([
        json.dumps({"question": " Capital of France? ", "answers": ["Paris"], "data_source": "geo", "id": 5,
                    "hops": 1}),
        "",
        json.dumps({"question": "Capital of Nepal?", "answers": "Kathmandu<|answer_split|>Katmandu"}),
        json.dumps({"question": "Year of the first Everest ascent?", "answers": [1953, "1953 AD"]}),
    ]) + "\n")
    q0, q1, q2 = load_questions(path)
    assert (q0.id, q0.text, q0.answers, q0.data_source) == ("5", "Capital of France?", ["Paris"], "geo")
    assert q0.metadata == {"row": 0, "hops": 1}
    assert (q1.id, q1.answers, q1.data_source) == ("2", ["Kathmandu", "Katmandu"], "unknown")
    assert q2.answers == ["1953", "1953 AD"]  # integer aliases become strings


@pytest.mark.parametrize(
    "row, where, field",
    [
        (igpo_row("nq", "x", "q?", ""), "row 1", "reward_model.ground_truth"),
        ({**igpo_row("nq", "x", "q?", "a"), "prompt": []}, "row 1", "prompt"),
        ({**igpo_row("nq", "x", "q?", "a"), "prompt": [{"content": "hi", "role": "system"}]}, "row 1",
         "prompt"),
        (igpo_row("nq", "x", "   ", "a"), "row 1", "prompt"),
    ],
)
def test_malformed_parquet_rows_name_file_row_field(tmp_path: Path, row: dict, where: str,
                                                    field: str) -> None:
    path = write_igpo(tmp_path / "bad.parquet", [igpo_row("nq", "ok", "fine?", "yes"), row])
    with pytest.raises(ValueError) as info:
        load_questions(path)
    assert str(info.value).startswith(f"{path}: {where}: field {field!r}")


@pytest.mark.parametrize(
    "obj, field",
    [({"answers": ["a"]}, "question"), ({"question": "q"}, "answers"),
     ({"question": "q", "answers": []}, "answers"),
     ({"question": "q", "answers": [None]}, "answers"), ({"question": 3, "answers": ["a"]}, "question"),
     ({"question": "q", "answers": {"x": 1}}, "answers")],
)
def test_malformed_jsonl_lines_name_file_line_field(tmp_path: Path, obj: dict, field: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok?", "answers": ["y"]}) + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(ValueError) as info:
        load_questions(path)
    assert str(info.value).startswith(f"{path}: line 2: field {field!r}")


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_questions(tmp_path / "none.parquet")
    (tmp_path / "q.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported question file type '.csv'"):
        load_questions(tmp_path / "q.csv")
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt', 'reward_model'\]"):
        load_questions(tmp_path / "other.parquet")
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answers": ["a"]}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl: line 2: invalid JSON"):
        load_questions(tmp_path / "broken.jsonl")


def test_filters_split_and_sources_keep_file_order(tmp_path: Path) -> None:
    rows = many_rows() + [igpo_row("nq", "nq_train", "train question?", "t", split="train")]
    path = write_igpo(tmp_path / "q.parquet", rows)
    assert len(load_questions(path)) == 24
    assert [q.id for q in load_questions(path, split="train")] == ["nq_train"]
    picked = load_questions(path, split="dev", data_sources=["Bamboogle", "tq"])
    assert [q.id for q in picked] == ["tq_0", "Bamboogle_0", "tq_1", "Bamboogle_1", "tq_2", "Bamboogle_2"] + [
        f"tq_{i}" for i in range(3, 10)]
    with pytest.raises(ValueError, match=r"data source\(s\) \['hotpotqa'\] not found"):
        load_questions(path, data_sources=["nq", "hotpotqa"])
    with pytest.raises(ValueError, match=r"no rows with split 'test'; splits present: \['dev', 'train'\]"):
        load_questions(path, split="test")


def test_max_per_source_is_seeded_deterministic_and_per_source(tmp_path: Path) -> None:
    path = write_igpo(tmp_path / "q.parquet", many_rows())
    a = load_questions(path, max_per_source=4, seed=3)
    assert a == load_questions(path, max_per_source=4, seed=3)
    assert list(group_by_source(load_questions(path))) == ["nq", "tq", "Bamboogle"]  # first-seen order
    groups = group_by_source(a)
    assert {s: len(v) for s, v in groups.items()} == {"nq": 4, "tq": 4, "Bamboogle": 3}
    # kept in file order within the output
    rows = [q.metadata["row"] for q in a]
    assert rows == sorted(rows)
    # one source's sample does not depend on which other sources are loaded
    only_nq = load_questions(path, data_sources=["nq"], max_per_source=4, seed=3)
    assert [q.id for q in only_nq] == [q.id for q in groups["nq"]]
    # another seed gives another sample of nq (10 choose 4 = 210 possible samples)
    assert [q.id for q in load_questions(path, data_sources=["nq"], max_per_source=4, seed=4)] != [
        q.id for q in only_nq]
    with pytest.raises(ValueError, match="max_per_source must be >= 1"):
        load_questions(path, max_per_source=0)


def test_shuffle_is_seeded_permutation(tmp_path: Path) -> None:
    path = write_igpo(tmp_path / "q.parquet", many_rows())
    plain = load_questions(path)
    s1 = load_questions(path, shuffle=True, seed=1)
    assert s1 == load_questions(path, shuffle=True, seed=1)
    assert s1 != plain and sorted(q.id for q in s1) == sorted(q.id for q in plain)
    assert load_questions(path, shuffle=True, seed=2) != s1


def test_jsonl_bad_bytes_bom_and_bad_ids_name_the_line(tmp_path: Path) -> None:
    ok = json.dumps({"question": "ok?", "answers": ["y"]}).encode()
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + ok + b"\n" + b'{"question": "caf\xe9?", "answers": ["a"]}\n')
    with pytest.raises(ValueError, match=r"bytes.jsonl: line 2: invalid UTF-8 at byte 17"):
        load_questions(path)
    path.write_bytes(b"\xef\xbb\xbf" + ok + b"\n")  # a byte-order mark opening the file is fine
    assert [q.text for q in load_questions(path)] == ["ok?"]
    for bad_id in ({"a": 1}, [1], True, ""):
        path.write_text(json.dumps({"question": "q?", "answers": ["a"], "id": bad_id}) + "\n")
        with pytest.raises(ValueError, match=r"line 1: field 'id'"):
            load_questions(path)
