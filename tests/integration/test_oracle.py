"""Scripted oracle trajectories through real bm25s, tokenised with a tokenizer trained by igpo.models.tiny
on the world's own texts: gold answers, strict parsing, token-in/token-out sequences, loss mask, noise."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from igpo.data.oracle import (
    OracleConfig,
    OracleStats,
    Step,
    oracle_dataset,
    oracle_episode,
    render_plain,
    tokenizer_corpus,
)
from igpo.data.questions import load_questions
from igpo.data.world import WorldConfig, build_world, write_world
from igpo.models.tiny import IM_END, train_tokenizer
from igpo.prompts import (
    PROBE_THINK,
    AgentProtocol,
    ChatPieces,
    format_docs,
    observation_text,
    parse_action,
    prompt_text,
)
from igpo.retriever.bm25 import BM25Retriever
from igpo.types import Doc, Episode

N_QUESTIONS = 300  # x 2 samples = 600 trajectories for the noise shares


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    world = build_world(WorldConfig())
    files = write_world(world, tmp_path_factory.mktemp("world"))
    tokenizer = train_tokenizer(tokenizer_corpus(world, 1000), vocab_size=2048)
    retriever = BM25Retriever(files.corpus, title_boost=True)
    retriever.setup()
    protocol = AgentProtocol()
    pieces = ChatPieces.from_tokenizer(tokenizer, protocol)
    yield world, files, tokenizer, retriever, protocol, pieces
    retriever.close()


@pytest.fixture(scope="module")
def dataset(env):
    world, _, tokenizer, retriever, protocol, pieces = env
    stats = OracleStats()
    questions = world.questions["train"][:N_QUESTIONS]
    episodes = oracle_dataset(questions, world, retriever, tokenizer, pieces, protocol, OracleConfig(),
                              samples_per_question=2, seed=0, stats=stats)
    return episodes, stats


def is_guess(e: Episode) -> bool:
    return parse_action(e.turns[-1].text).think.endswith(" I guess.")


def chain_names(world, e: Episode) -> list[str]:
    return [world.value_name(v) for v in world.question(e.question.id).metadata["chain"]]


def test_trajectories_reach_the_gold_answer_through_the_retriever(env, dataset) -> None:
    world, *_ = env
    episodes, stats = dataset
    assert len(episodes) == 2 * N_QUESTIONS and stats.dropped == 0
    guesses = 0
    for e in episodes:
        names, hops = chain_names(world, e), e.question.metadata["hops"]
        searches = [t for t in e.turns if t.kind == "search"]
        assert e.finish == "answer" and e.turns[-1].kind == "answer" and len(e.turns) <= 4
        assert all(t.docs and all(d.score > 0 for d in t.docs) for t in searches)  # real bm25s results
        chain_searches = [t.content for t in searches if t.content in names]
        if is_guess(e):
            guesses += 1
            assert hops == 2 and chain_searches == names[:1] and e.answer not in e.question.answers
            kind = e.question.metadata["answer_type"]
            if kind == "year":
                assert 1900 <= int(e.answer) <= 2020
            else:
                assert e.answer in {x.name for x in world.of_type(kind)}
        else:
            assert e.answer in e.question.answers
            assert chain_searches == names[:hops]  # one search per hop, in chain order
            assert any(e.answer in d.text for d in searches[-1].docs)  # read off the last retrieved docs
    assert guesses == stats.guesses > 0
    assert stats.retrieval_success == 1.0 and stats.lookups == sum(
        1 if is_guess(e) else e.question.metadata["hops"] for e in episodes)


def test_every_turn_parses_and_decodes_to_the_rendered_texts(env, dataset) -> None:
    _, _, tokenizer, _, protocol, pieces = env
    for e in dataset[0]:
        text = prompt_text(tokenizer, e.question.text, protocol)
        steps = []
        for t in e.turns:
            action = parse_action(t.text, protocol)
            assert (action.kind, action.content) == (t.kind, t.content)
            assert parse_action(tokenizer.decode(t.action_ids), protocol) == action
            text += t.text
            if t.kind == "search":
                text += observation_text(pieces, format_docs(t.docs, tokenizer, protocol, 64), protocol)
            else:
                assert t.obs_ids == [] and t is e.turns[-1]
            steps.append(Step(action.think, t.kind, t.content, t.docs))
        assert tokenizer.decode(e.token_ids) == text
        assert render_plain(e.question.text, steps, protocol) == text  # the tokenizer-free renderer agrees


def test_loss_mask_is_one_exactly_on_action_tokens(env, dataset) -> None:
    _, _, tokenizer, _, _, _ = env
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    for e in dataset[0]:
        ids, mask = e.token_ids, e.loss_mask
        assert len(ids) == len(mask)
        expected = [0] * len(e.prompt_ids)
        for t in e.turns:
            expected += [1] * len(t.action_ids) + [0] * len(t.obs_ids)
            assert t.action_logprobs == [0.0] * len(t.action_ids)
        assert mask == expected
        learned = [i for i, m in zip(ids, mask, strict=True) if m]
        assert tokenizer.decode(learned) == "".join(t.text for t in e.turns)
        assert im_end not in learned and mask[: len(e.prompt_ids)] == [0] * len(e.prompt_ids)


def test_noise_shares_are_close_to_config(env, dataset) -> None:
    world, *_ = env
    episodes, stats = dataset
    cfg = OracleConfig()
    wasted = [e.turns[0].content != chain_names(world, e)[0] for e in episodes]
    multi = [e for e in episodes if e.question.metadata["hops"] >= 2]
    non_guess = [e for e in episodes if not is_guess(e)]
    probe = [parse_action(e.turns[-1].text).think == PROBE_THINK for e in non_guess]
    for observed, n, p in ((sum(wasted), len(episodes), cfg.wasted_search),
                           (sum(map(is_guess, multi)), len(multi), cfg.early_guess),
                           (sum(probe), len(non_guess), cfg.probe_think)):
        assert abs(observed / n - p) <= 4 * math.sqrt(p * (1 - p) / n), (observed, n, p)
    assert (sum(wasted), sum(probe)) == (stats.wasted, stats.probe)
    for e, w in zip(episodes, wasted, strict=True):  # a wasted search is followed by "No match. I need ..."
        if w:
            assert parse_action(e.turns[1].text).think.startswith("No match. I need ")


def test_zero_noise_gives_clean_chains_and_full_probe_share(env) -> None:
    world, _, tokenizer, retriever, protocol, pieces = env
    questions = world.questions["train"][:60]
    cfg = OracleConfig(wasted_search=0.0, early_guess=0.0, probe_think=1.0)
    episodes = oracle_dataset(questions, world, retriever, tokenizer, pieces, protocol, cfg)
    for e in episodes:
        assert [t.content for t in e.turns[:-1]] == chain_names(world, e)[:-1]
        assert e.answer in e.question.answers and parse_action(e.turns[-1].text).think == PROBE_THINK


def test_three_hop_fits_max_turns_without_wasted_searches(tmp_path: Path) -> None:
    world = build_world(WorldConfig(n_people=40, n_companies=10, n_cities=8, n_countries=3, n_first_names=20,
                                    n_last_names=20, three_hop=True, seed=2))
    files = write_world(world, tmp_path)
    retriever = BM25Retriever(files.corpus)
    retriever.setup()
    tokenizer = train_tokenizer(tokenizer_corpus(world, 100), vocab_size=600)
    three = [q for q in world.questions["train"] if q.metadata["hops"] == 3]
    stats = OracleStats()
    cfg = OracleConfig(wasted_search=1.0, early_guess=0.0)
    eps = oracle_dataset(three, world, retriever, tokenizer, cfg=cfg, samples_per_question=1, stats=stats)
    assert len(eps) == len(three) > 0 and stats.wasted == stats.wasted_eligible == 0
    assert all(len(e.turns) == 4 and e.answer in e.question.answers for e in eps)
    with pytest.raises(ValueError, match=r"OracleConfig\.early_guess="):
        OracleConfig(early_guess=1.5)
    retriever.close()


class HidingRetriever:
    """The real retriever with one document removed from the results of the first `hide_for` queries."""

    def __init__(self, inner: BM25Retriever, doc_id: str, hide_for: int) -> None:
        self.inner, self.doc_id, self.hide_for, self.queries = inner, doc_id, hide_for, []

    def search_batch(self, queries: list[str], k: int) -> list[list[Doc]]:
        self.queries += queries
        out = self.inner.search_batch(queries, k)
        if len(self.queries) <= self.hide_for:
            out = [[d for d in docs if d.id != self.doc_id] for docs in out]
        return out


def test_missing_document_is_retried_then_dropped(env) -> None:
    world, _, tokenizer, retriever, protocol, pieces = env
    q = next(q for q in world.questions["train"] if q.metadata["template"] == "born_country")
    cfg = OracleConfig(wasted_search=0.0, early_guess=0.0, probe_think=0.0)
    subject = world.entities[q.metadata["subject"]]

    stats, hiding = OracleStats(), HidingRetriever(retriever, subject.id, hide_for=1)
    e = oracle_episode(q, world, hiding, tokenizer, pieces, protocol, random.Random(0), cfg, stats)
    assert hiding.queries[:2] == [subject.name, f"{subject.name} married"]  # reformulated retry
    assert parse_action(e.turns[1].text).think == f"No match. I need the birthplace of {subject.name}."
    assert e.answer in q.answers and len(e.turns) == 4
    assert (stats.lookups, stats.first_try_hits, stats.retries, stats.retry_hits) == (2, 1, 1, 1)

    stats, hiding = OracleStats(), HidingRetriever(retriever, subject.id, hide_for=10)
    assert oracle_episode(q, world, hiding, tokenizer, pieces, protocol, random.Random(0), cfg, stats) is None
    assert (stats.dropped, stats.kept, stats.retries) == (1, 0, 1)
    # no turn left for a retry: 2 hops + answer + a wasted search already fill max_turns=4
    stats, hiding = OracleStats(), HidingRetriever(retriever, subject.id, hide_for=2)
    tight = replace(cfg, wasted_search=1.0)
    rng = random.Random(0)
    assert oracle_episode(q, world, hiding, tokenizer, pieces, protocol, rng, tight, stats) is None
    assert (stats.dropped, stats.retries) == (1, 0)


def test_deterministic_and_independent_of_batching(env, dataset) -> None:
    world, files, tokenizer, retriever, protocol, pieces = env
    questions = world.questions["train"][:N_QUESTIONS]
    half = oracle_dataset(questions[:50], world, retriever, tokenizer, pieces, protocol,
                          samples_per_question=2)
    assert [e.token_ids for e in half] == [e.token_ids for e in dataset[0][:100]]
    # questions read back from the parquet file (metadata layout of the loader) give the same episodes
    loaded = {q.id: q for q in load_questions(files.parquet["train"])}
    again = oracle_dataset([loaded[q.id] for q in questions[:50]], world, retriever, tokenizer, pieces,
                           protocol, samples_per_question=2)
    assert [e.token_ids for e in again] == [e.token_ids for e in half]


def test_tokenizer_corpus_holds_protocol_docs_and_parsable_trajectories(env) -> None:
    world, *_ = env
    texts = tokenizer_corpus(world, 50, seed=1)
    assert len(texts) == 3 + len(world.docs) + 50
    assert AgentProtocol().system_prompt in texts and texts == tokenizer_corpus(world, 50, seed=1)
    assert all(f"{d.title}. {d.text}" in "\n".join(texts) for d in world.docs)
    for text in texts[-50:]:
        assert text.startswith("<|im_start|>system\n") and "<answer>" in text


def test_renamed_trajectories_swap_every_name_consistently(env, dataset) -> None:
    """rename=1: same scripts and retrieval, then each trajectory's names swapped for same-type names.
    Each original query maps to one same-type name every time it occurs, the renamed query's own document
    keeps its rank, a correct answer is still read off the last documents, the subject becomes a train
    entity's name, and the result is deterministic."""
    world, _, tokenizer, retriever, protocol, pieces = env
    questions = world.questions["train"][:60]
    cfg = OracleConfig(rename=1.0)
    stats = OracleStats()
    renamed = oracle_dataset(questions, world, retriever, tokenizer, pieces, protocol, cfg, samples_per_question=2,
                             seed=0, stats=stats)
    plain = oracle_dataset(questions, world, retriever, tokenizer, pieces, protocol, replace(cfg, rename=0.0),
                           samples_per_question=2, seed=0)
    assert stats.renamed == len(renamed) == len(plain) == 120
    train_names = {e.name for e in world.entities.values() if e.id not in world.heldout}
    types = {e.name: e.type for e in world.entities.values()}
    changed = 0
    for r, p in zip(renamed, plain, strict=True):
        assert [t.kind for t in r.turns] == [t.kind for t in p.turns]
        subject = world.entities[p.question.metadata["subject"]].name
        # one consistent map: each original query becomes one name of the same type, every time
        table: dict[str, str] = {}
        for tr, tp in zip(r.turns, p.turns, strict=True):
            if tp.kind == "search" and tp.content in types:
                assert table.setdefault(tp.content, tr.content) == tr.content
                assert types[tr.content] == types[tp.content]
                # the renamed query's own document is the renamed original document, in the same rank
                assert [d.id for d in tr.docs] == [d.id for d in tp.docs]
                own = [d for d in tr.docs if d.title == tr.content]
                assert own and own[0].text.startswith(tr.content)
        if subject in table:
            assert table[subject] in train_names and table[subject] in r.question.text
            assert subject not in r.question.text or table[subject] == subject
        changed += r.question.text != p.question.text
        if r.answer in r.question.answers:  # a non-guess: the answer is read off the last documents
            assert any(r.answer in d.text for d in r.turns[-2].docs)
        assert parse_action(r.turns[-1].text).kind == "answer"
    assert changed > 100
    again = oracle_dataset(questions, world, retriever, tokenizer, pieces, protocol, cfg, samples_per_question=2,
                           seed=0)
    assert [e.token_ids for e in again] == [e.token_ids for e in renamed]
    with pytest.raises(ValueError, match="rename"):
        OracleConfig(rename=1.5)
