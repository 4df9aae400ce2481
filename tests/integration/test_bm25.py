"""BM25Retriever with real bm25s: hand-computed scores, ranking, batch shape, saved-index reuse/rebuild."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from igpo.retriever import BM25Retriever, Retriever
from igpo.retriever.bm25 import META_FILE
from igpo.retriever.corpus import iter_corpus

FIXTURE = Path(__file__).parent.parent / "fixtures" / "tiny_corpus.jsonl"


def write_corpus(path: Path, docs: list[tuple[str, str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "contents": f'"{t}"\n{x}'}) + "\n" for i, t, x in docs))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A copy of the fixture corpus (the index is written beside it, so never beside the fixture)."""
    return Path(shutil.copy(FIXTURE, tmp_path / "corpus.jsonl"))


@pytest.fixture
def retriever(corpus: Path) -> BM25Retriever:
    r = BM25Retriever(corpus)
    r.setup()
    yield r
    r.close()


def test_scores_match_lucene_bm25_by_hand(tmp_path: Path) -> None:
    """Lucene BM25: idf = ln(1 + (N - n + .5)/(n + .5)), tf part = tf / (tf + k1 (1 - b + b dl/avgdl))."""
    path = write_corpus(tmp_path / "c.jsonl", [("a", "Alpha", "alpha beta"), ("g", "Gamma", "beta delta"),
                                                ("d", "Delta", "epsilon")])
    k1, b = 1.5, 0.75
    # Without title boost the indexed texts are "Alpha. alpha beta", "Gamma. beta delta", "Delta. epsilon":
    # token counts 3, 3, 2 (avgdl 8/3).
    plain = BM25Retriever(path, index_dir=tmp_path / "plain", k1=k1, b=b, title_boost=False)
    plain.setup()
    (alpha,), delta = plain.search_batch(["alpha"], k=3)[0], plain.search_batch(["delta"], k=3)[0]
    assert alpha.id == "a"
    idf_alpha = math.log(1 + 2.5 / 1.5)  # "alpha" is in 1 of 3 docs
    assert alpha.score == pytest.approx(idf_alpha * 2 / (2 + k1 * (1 - b + b * 3 / (8 / 3))), rel=1e-5)
    idf_delta = math.log(1 + 1.5 / 2.5)  # "delta" is in 2 of 3 docs
    assert [d.id for d in delta] == ["d", "g"]  # the shorter doc wins at equal tf
    assert delta[0].score == pytest.approx(idf_delta * 1 / (1 + k1 * (1 - b + b * 2 / (8 / 3))), rel=1e-5)
    assert delta[1].score == pytest.approx(idf_delta * 1 / (1 + k1 * (1 - b + b * 3 / (8 / 3))), rel=1e-5)
    # With title boost: "Alpha. Alpha. alpha beta" (4 tokens), "Gamma. Gamma. beta delta" (4),
    # "Delta. Delta. epsilon" (3): avgdl 11/3, and alpha's tf is 3.
    boosted = BM25Retriever(path, index_dir=tmp_path / "boosted", k1=k1, b=b, title_boost=True)
    boosted.setup()
    (alpha,) = boosted.search_batch(["alpha"], k=3)[0]
    assert alpha.score == pytest.approx(idf_alpha * 3 / (3 + k1 * (1 - b + b * 4 / (11 / 3))), rel=1e-5)


def test_title_boost_puts_the_entity_page_first(tmp_path: Path) -> None:
    path = write_corpus(tmp_path / "c.jsonl", [
        ("m", "Mercury", "The smallest planet of the Solar System, closest to the Sun."),
        ("f", "Freddie", "Freddie Mercury sang and Mercury played piano on stage."),
        ("v", "Venus", "The second planet from the Sun, named after a goddess."),
    ])
    top = {}
    for boost in (False, True):
        r = BM25Retriever(path, index_dir=tmp_path / f"idx{boost}", title_boost=boost)
        r.setup()
        top[boost] = r.search_batch(["Mercury"], k=2)[0][0].id
    assert top == {False: "f", True: "m"}


def test_exact_title_ranks_its_doc_first(retriever: BM25Retriever) -> None:
    docs = list(iter_corpus(FIXTURE))
    results = retriever.search_batch([d.title for d in docs], k=3)
    assert [r[0].id for r in results] == [d.id for d in docs]
    assert results[0][0].title == "Ada Lovelace" and results[0][0].text.startswith("Ada Lovelace was")


def test_batch_shape_and_edge_cases(retriever: BM25Retriever) -> None:
    assert isinstance(retriever, Retriever)
    queries = ["capital of Nepal", "", "   ", "the of and", "xyzzy plugh", "Amsterdam painting museum"]
    out = retriever.search_batch(queries, k=4)
    assert len(out) == len(queries)
    assert out[1] == out[2] == out[3] == out[4] == []  # empty, blank, stopwords only, unknown words
    for docs in (out[0], out[5]):
        assert 1 <= len(docs) <= 4
        assert all(d.score > 0 for d in docs)
        assert [d.score for d in docs] == sorted((d.score for d in docs), reverse=True)
    assert {d.title for d in out[0][:2]} == {"Nepal", "Kathmandu"}
    # k above the corpus size is capped, and docs sharing no term are not returned
    many = retriever.search_batch(["capital"], k=1000)[0]
    assert 0 < len(many) < 30 and all("capital" in d.text for d in many)
    assert retriever.search_batch(["Paris"], k=0) == [[]]
    assert retriever.search_batch([], k=3) == []


def test_index_is_saved_reused_and_rebuilt(corpus: Path) -> None:
    first = BM25Retriever(corpus)
    first.setup()
    assert first.built and (corpus.parent / "corpus.jsonl.bm25s" / META_FILE).is_file()
    expected = first.search_batch(["Rembrandt painting", "highest mountain"], k=3)
    # nothing else beside the corpus but the lock file: the temp dir was renamed into place
    assert sorted(p.name for p in corpus.parent.iterdir()) == [".corpus.jsonl.bm25s.lock", "corpus.jsonl",
                                                               "corpus.jsonl.bm25s"]

    again = BM25Retriever(corpus)
    again.setup()
    assert not again.built and again.search_batch(["Rembrandt painting", "highest mountain"], k=3) == expected

    other_params = BM25Retriever(corpus, k1=1.2)
    other_params.setup()
    assert other_params.built

    # a touch (same content, new mtime) keeps the index: the sha256 still matches
    os.utime(corpus, ns=(1, 1))
    touched = BM25Retriever(corpus, k1=1.2)
    touched.setup()
    assert not touched.built

    # new content: rebuilt, and the new document is found
    with corpus.open("a") as f:
        f.write(json.dumps({"id": "new", "contents": '"Zanzibar"\nZanzibar is an archipelago.'}) + "\n")
    changed = BM25Retriever(corpus, k1=1.2)
    changed.setup()
    assert changed.built and changed.num_docs == 31
    assert changed.search_batch(["Zanzibar"], k=1)[0][0].id == "new"
    assert sorted(p.name for p in corpus.parent.iterdir()) == [".corpus.jsonl.bm25s.lock", "corpus.jsonl",
                                                               "corpus.jsonl.bm25s"]


def _slow_setup(corpus: str, barrier) -> tuple[bool, int]:
    """One process of the concurrency test: every build takes 1 s, so both would build without the lock."""
    r = BM25Retriever(corpus)
    build = r._build

    def slow_build(fingerprint):
        time.sleep(1.0)
        build(fingerprint)

    r._build = slow_build
    barrier.wait()  # both processes call setup() at the same moment
    r.setup()
    return r.built, r.num_docs


def test_concurrent_setups_build_once_and_both_load_the_whole_index(corpus: Path) -> None:
    """Two processes (the two ranks of a DDP run) set up the same new index at once: one builds, the other
    waits on the lock and loads the finished index (CI once saw rank 1 load a half-replaced one)."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager, ProcessPoolExecutor(2, mp_context=ctx) as pool:
        barrier = manager.Barrier(2)
        results = list(pool.map(_slow_setup, [str(corpus)] * 2, [barrier] * 2))
    assert sorted(built for built, _ in results) == [False, True]
    assert [n for _, n in results] == [30, 30]


def test_index_without_its_corpus_is_a_clear_error(corpus: Path) -> None:
    BM25Retriever(corpus).setup()
    (corpus.parent / "corpus.jsonl.bm25s" / "corpus.jsonl").unlink()
    with pytest.raises(RuntimeError, match=r"corpus\.jsonl\.bm25s has no corpus .*delete the directory"):
        BM25Retriever(corpus).setup()


def test_custom_index_dir_and_stemmer(corpus: Path, tmp_path: Path) -> None:
    r = BM25Retriever(corpus, index_dir=tmp_path / "idx" / "stemmed", stemmer="english")
    r.setup()
    assert (tmp_path / "idx" / "stemmed" / META_FILE).is_file()
    # the corpus says "painting" (The Night Watch) once; "paintings" only matches through the stem "paint"
    assert [d.title for d in r.search_batch(["paintings"], k=3)[0]] == ["The Night Watch"]
    plain = BM25Retriever(corpus)
    plain.setup()
    assert plain.search_batch(["paintings"], k=3) == [[]]


def test_lifecycle_errors(corpus: Path, tmp_path: Path) -> None:
    r = BM25Retriever(corpus)
    with pytest.raises(RuntimeError, match="before setup"):
        r.search_batch(["x"], k=1)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        BM25Retriever(tmp_path / "missing.jsonl").setup()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        BM25Retriever(tmp_path / "empty.jsonl").setup()
    r.setup()
    r.close()
    with pytest.raises(RuntimeError, match="before setup"):
        r.search_batch(["x"], k=1)
