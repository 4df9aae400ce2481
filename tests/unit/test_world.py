"""The synthetic world: determinism, consistency of questions with the written corpus, held-out split,
unique names, counts, and the IGPO parquet schema. Facts are read back from the corpus text with the
test's own regexes, never from the in-memory world."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import Stemmer

from igpo.data.questions import load_questions
from igpo.data.world import (
    SPLITS,
    TEMPLATES,
    WorldConfig,
    build_world,
    cfg_hash,
    ensure_world,
    parquet_schema,
    write_world,
)

DOC_PATTERNS = {  # the default sentences, written out independently of the generator
    "person": re.compile(r"(?P<name>.+?) was born in (?P<born>.+?), works for (?P<employer>.+?) "
                         r"and is married to (?P<spouse>.+?)\."),
    "company": re.compile(r"(?P<name>.+?) was founded in (?P<founded>\d{4}) "
                          r"and is headquartered in (?P<hq>.+?)\."),
    "city": re.compile(r"(?P<name>.+?) is a city in (?P<country>.+?)\."),
}
SMALL = dict(n_people=60, n_companies=20, n_cities=15, n_countries=4, n_first_names=30, n_last_names=30)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory):
    world = build_world(WorldConfig())
    return world, write_world(world, tmp_path_factory.mktemp("world"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def corpus_facts(path: Path) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(doc id -> title, title -> facts) parsed from Search-R1 `contents` = '"Title"\\ntext'."""
    titles, facts = {}, {}
    for row in read_jsonl(path):
        head, text = row["contents"].split("\n", 1)
        assert head.startswith('"') and head.endswith('"'), row
        title = head[1:-1]
        matches = [(k, m) for k, p in DOC_PATTERNS.items() if (m := p.match(text))]
        assert len(matches) == 1, text
        kind, m = matches[0]
        assert m["name"] == title and row["id"].startswith(kind + "_")
        titles[row["id"]] = title
        facts[title] = {k: v for k, v in m.groupdict().items() if k != "name"}
    return titles, facts


def check_answers_follow_corpus(files) -> int:
    titles, facts = corpus_facts(files.corpus)
    n = 0
    for split in SPLITS:
        for row in read_jsonl(files.jsonl[split]):
            meta = row["metadata"]
            cur = titles[meta["subject"]]
            assert cur in row["question"]
            for rel, doc_id in zip(meta["relations"], meta["docs"], strict=True):
                assert titles[doc_id] == cur  # the gold chain names the document read at each hop
                cur = facts[cur][rel]
            assert row["answers"] == [cur], row
            assert meta["hops"] == len(meta["relations"]) == TEMPLATES[meta["template"]].hops
            assert row["data_source"] == f"synth_{meta['hops']}hop" and meta["split"] == split
            n += 1
    return n


def test_every_answer_follows_from_the_corpus_text(written) -> None:
    _, files = written
    assert check_answers_follow_corpus(files) == 3536 + 884


def test_three_hop_and_distractor_sentences_stay_consistent(tmp_path: Path) -> None:
    cfg = WorldConfig(**SMALL, three_hop=True, distractor_sentences=2, seed=5)
    world = build_world(cfg)
    files = write_world(world, tmp_path)
    assert check_answers_follow_corpus(files) == sum(len(q) for q in world.questions.values())
    assert {q.data_source for q in world.questions["train"]} == {"synth_1hop", "synth_2hop", "synth_3hop"}
    assert all(d.text.count(".") == 3 for d in world.docs)  # fact sentence + 2 distractor sentences
    assert "spouse_employer_hq" in {q.metadata["template"] for q in world.questions["train"]}


def test_same_config_gives_identical_bytes_and_seed_changes_the_world(tmp_path: Path) -> None:
    cfg = WorldConfig(**SMALL)
    a, b = write_world(build_world(cfg), tmp_path / "a"), write_world(build_world(cfg), tmp_path / "b")
    names = sorted(p.name for p in a.root.iterdir())
    assert names == sorted(p.name for p in b.root.iterdir())
    expected = ["corpus.jsonl", "world.json", *(f"{s}.{e}" for s in SPLITS for e in ("jsonl", "parquet"))]
    assert names == sorted(expected)
    for name in names:  # also: no temp files are left behind
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name
    c = write_world(build_world(WorldConfig(**{**SMALL, "seed": 1})), tmp_path / "c")
    assert c.corpus.read_bytes() != a.corpus.read_bytes()
    assert cfg_hash(cfg) == cfg_hash(WorldConfig(**SMALL)) != cfg_hash(WorldConfig(**{**SMALL, "seed": 1}))
    # Hydra hands lists, not tuples: same config, same hash
    assert cfg_hash(WorldConfig(templates=list(WorldConfig().templates))) == cfg_hash(WorldConfig())


def test_heldout_subjects_never_appear_as_train_subjects(written) -> None:
    world, files = written
    subjects = {s: {r["metadata"]["subject"] for r in read_jsonl(files.jsonl[s])} for s in SPLITS}
    held = subjects["heldout"] | subjects["validation"]
    assert not subjects["train"] & held
    # 20 % of each type is held out: 0.2*500 people, 0.2*120 companies, 0.2*60 cities; all are subjects
    per_type = Counter(s.split("_")[0] for s in held)
    assert per_type == {"person": 100, "company": 24, "city": 12}
    assert held == set(world.heldout)
    titles, _ = corpus_facts(files.corpus)
    assert world.heldout <= set(titles)  # held-out entities keep their documents
    ids = {s: {r["id"] for r in read_jsonl(files.jsonl[s])} for s in SPLITS}
    assert not ids["validation"] & ids["heldout"] and not ids["train"] & (ids["validation"] | ids["heldout"])
    # held-out entities still appear as values (e.g. a train person married to a held-out person)
    assert any(set(q.metadata["chain"][1:]) & world.heldout for q in world.questions["train"])


def test_names_are_unique_across_types_even_after_stemming(written) -> None:
    world, _ = written
    names = [e.name for e in world.entities.values()]
    assert len(names) == len(set(names)) == 692
    words_by_type = {t: {w for e in world.of_type(t) for w in e.name.split()}
                     for t in ("person", "company", "city", "country")}
    words_by_type["company"] -= {"Corp", "Labs", "Group", "Works", "Systems"}
    all_words = [w for ws in words_by_type.values() for w in ws]
    assert len(all_words) == len(set(all_words))  # no word is shared between entity types
    stems = Stemmer.Stemmer("english").stemWords([w.lower() for w in all_words])
    assert len(set(stems)) == len(all_words)
    from bm25s.stopwords import STOPWORDS_EN

    assert not {w.lower() for w in all_words} & set(STOPWORDS_EN)
    people = [e.name.split() for e in world.of_type("person")]
    assert max(Counter(f for f, _ in people).values()) > 1  # names share parts
    assert max(Counter(last for _, last in people).values()) > 1


def test_counts_match_config(written) -> None:
    world, files = written
    manifest = json.loads(files.manifest.read_text())
    assert manifest["counts"]["entities"] == {"person": 500, "company": 120, "city": 60, "country": 12}
    assert manifest["counts"]["docs"] == 500 + 120 + 60 == len(read_jsonl(files.corpus))
    # one question per (subject, template): 8 person templates, 3 company, 1 city
    train = 8 * 400 + 3 * 96 + 1 * 48
    validation = 8 * round(0.2 * 100) + 3 * round(0.2 * 24) + 1 * round(0.2 * 12)
    assert manifest["counts"]["questions"] == {"train": train, "validation": validation,
                                               "heldout": 8 * 100 + 3 * 24 + 12 - validation}
    assert manifest["cfg_hash"] == cfg_hash(world.cfg)
    assert Counter(q.data_source for q in world.questions["train"]) == {"synth_1hop": 3 * 400 + 2 * 96 + 48,
                                                                        "synth_2hop": 5 * 400 + 96}
    spouses = {e.id: e.facts["spouse"] for e in world.of_type("person")}
    assert all(spouses[b] == a != b for a, b in spouses.items())  # symmetric pairing
    years = [int(e.facts["founded"]) for e in world.of_type("company")]
    assert 1900 <= min(years) and max(years) <= 2020
    assert {world.entities[c.facts["country"]].type for c in world.of_type("city")} == {"country"}
    assert len({c.facts["country"] for c in world.of_type("city")}) == 12  # every country has a city


def test_parquet_round_trips_with_the_igpo_schema(written) -> None:
    world, files = written
    for split in SPLITS:
        table = pq.read_table(files.parquet[split])
        assert table.schema.remove_metadata() == parquet_schema()
        rows, lines = table.to_pylist(), read_jsonl(files.jsonl[split])
        assert len(rows) == len(lines) == len(world.questions[split])
        for row, line in zip(rows, lines, strict=True):
            assert row["prompt"] == [{"content": line["question"], "role": "user"}]
            assert row["reward_model"] == {"ground_truth": line["answers"], "style": "rule"}
            assert row["data_source"] == line["data_source"]
            assert row["extra_info"] == {"index": line["id"], **line["metadata"]}
        loaded = load_questions(files.parquet[split])  # the project's own loader reads it back
        assert [(q.id, q.text, q.answers, q.data_source) for q in loaded] == [
            (q.id, q.text, q.answers, q.data_source) for q in world.questions[split]]


def test_ensure_world_caches_by_config_hash(tmp_path: Path) -> None:
    cfg = WorldConfig(**SMALL)
    files = ensure_world(cfg, tmp_path)
    assert files.root.name == f"world-{cfg_hash(cfg)}" and files.manifest.exists()
    stamp = files.corpus.stat().st_mtime_ns
    again = ensure_world(cfg, tmp_path)
    assert again == files and files.corpus.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("bad, field", [
    (dict(n_people=11), "n_people"),
    (dict(templates=("born", "nope")), "templates"),
    (dict(heldout_frac=0.0), "heldout_frac"),
    (dict(year_range=(2000, 1990)), "year_range"),
    (dict(city_doc="{name} lies in a land."), "city_doc"),
    (dict(n_people=1000, n_first_names=10, n_last_names=10), "n_people"),
])
def test_bad_config_names_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"WorldConfig\.{field}="):
        WorldConfig(**bad)


def test_parse_doc_rejects_foreign_text(written) -> None:
    world, _ = written
    assert world.parse_doc("city", world.doc("city_0000").text) == {"country": world.value_name(
        world.entities["city_0000"].facts["country"])}
    with pytest.raises(ValueError, match="company document does not match"):
        world.parse_doc("company", "Nothing to see here.")
    with pytest.raises(KeyError, match="no entity named"):
        world.by_name("Nobody Atall")
