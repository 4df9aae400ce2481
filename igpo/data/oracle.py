"""Scripted expert trajectories on the synthetic world (SFT warm-start data), run through a real retriever.

Per hop the oracle thinks what it needs ("I need the birthplace of X."), searches the entity's name,
finds the entity's own document among the top-k results and reads the fact from the document text
(never from the in-memory world), restating it in the next think ("X was born in C. I need the country
of C."). If the needed document is not in the top-k it retries once with a reformulated query (the name
plus a type word, e.g. "Garmi city"); if that also misses, or the turn budget would be exceeded, the
trajectory is dropped and counted in `OracleStats` (a searcher that cannot find the fact has no honest
answer to teach).

Noise (docs/synthetic-testbed.md §1, §6, §8): a share of trajectories start with a wasted search for a
random unrelated entity ("No match. I need ..."); a share of multi-hop ones answer a random entity of
the right type right after hop 1 ("... I guess."); a share of the other final turns think exactly the
protocol's probe think, so the IG probe's pseudo-think is in the SFT distribution. A noise mode is only
applied when it fits into `max_turns`; its share is counted over the trajectories it could apply to.
With `rename` > 0 a share of trajectories are rewritten after retrieval with their entity names swapped
for other names of the same type (`Renamer`), so the only way to get the answer right is to copy it from
the documents in context.

Episodes are tokenised exactly like the rollout loop builds them: prompt ids, per turn the action's ids,
then the observation's ids after a search; the final answer turn has no observation.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from igpo.data.world import RELATIONS, World
from igpo.prompts import AgentProtocol, ChatPieces, encode, observation_ids, observation_text, prompt_ids
from igpo.types import Doc, Episode, Question, Turn, TurnKind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from igpo.retriever.base import Retriever

SearchFn = Callable[[list[str]], list[list[Doc]]]
CHATML_PIECES = ChatPieces("<|im_end|>", "\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
NEED = {"born": "the birthplace", "employer": "the employer", "spouse": "the spouse",
        "hq": "the headquarters", "founded": "the founding year", "country": "the country"}
FACT = {"born": "{s} was born in {v}.", "employer": "{s} works for {v}.", "spouse": "{s} is married to {v}.",
        "hq": "{s} is headquartered in {v}.", "founded": "{s} was founded in {v}.",
        "country": "{s} is in {v}."}
TYPE_HINT = {"person": "married", "company": "founded", "city": "city"}  # reformulated query = name + hint


@dataclass(frozen=True)
class OracleConfig:
    """Retrieval, turn budget and noise shares of the scripted oracle."""

    k: int = 2  # documents per search
    max_turns: int = 4
    max_doc_tokens: int = 64  # as igpo.rollout.RolloutConfig; the 1-sentence docs are ~30 tokens
    wasted_search: float = 0.25  # share starting with a search for an unrelated entity
    early_guess: float = 0.2  # share of multi-hop trajectories that guess right after hop 1
    probe_think: float = 0.2  # share of non-guess final turns whose think is the protocol's probe think
    retries: int = 1  # reformulated searches when the needed document is missing, before dropping
    # share of trajectories whose entity names are swapped, consistently within the trajectory (question,
    # thinks, queries, documents, answer), for other names of the same type: facts stop being memorisable,
    # so the warm start learns to copy names from its context, which is what held-out questions need
    rename: float = 0.0

    def __post_init__(self) -> None:
        for name in ("wasted_search", "early_guess", "probe_think", "rename"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"OracleConfig.{name}={getattr(self, name)!r}: must be in [0, 1]")
        for name in ("k", "max_turns", "max_doc_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"OracleConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if self.retries < 0:
            raise ValueError(f"OracleConfig.retries={self.retries!r}: must be >= 0")


@dataclass
class OracleStats:
    """Counts over oracle runs: retrieval success, drops, and realised noise shares."""

    kept: int = 0
    dropped: int = 0  # needed document not found after retries, or turn budget too small
    lookups: int = 0  # hops that searched for the entity holding the needed fact
    first_try_hits: int = 0  # ... whose document was in the top-k on the first search
    retries: int = 0
    retry_hits: int = 0
    wasted: int = 0
    wasted_eligible: int = 0
    guesses: int = 0
    guess_eligible: int = 0
    probe: int = 0
    probe_eligible: int = 0
    renamed: int = 0  # trajectories whose names were swapped (OracleConfig.rename)

    @property
    def retrieval_success(self) -> float:
        return self.first_try_hits / self.lookups if self.lookups else float("nan")

    def summary(self) -> dict[str, float]:
        def share(a: int, b: int) -> float:
            return a / b if b else float("nan")

        return {**asdict(self), "retrieval_success": self.retrieval_success,
                "wasted_share": share(self.wasted, self.wasted_eligible),
                "guess_share": share(self.guesses, self.guess_eligible),
                "probe_share": share(self.probe, self.probe_eligible)}


@dataclass
class Step:
    """One scripted assistant action and, for a search, the documents it got back."""

    think: str
    kind: TurnKind
    content: str
    docs: list[Doc] = field(default_factory=list)


def _script(q: Question, world: World, rng: random.Random, cfg: OracleConfig, protocol: AgentProtocol,
            stats: OracleStats) -> Script:
    """Yield search queries, receive their documents; return the steps, or None when dropped."""
    q = world.question(q.id)  # the chain metadata, also for questions read back from parquet/jsonl
    relations = q.metadata["relations"]
    cur = world.entities[q.metadata["subject"]]
    u_wasted, u_guess, u_probe = rng.random(), rng.random(), rng.random()  # always 3 draws: stable streams
    guess_ok = len(relations) >= 2
    guess = guess_ok and u_guess < cfg.early_guess
    needed = (1 if guess else len(relations)) + 1
    if needed > cfg.max_turns:
        stats.dropped += 1
        return None
    wasted_ok = needed + 1 <= cfg.max_turns
    wasted = wasted_ok and u_wasted < cfg.wasted_search
    probe = not guess and u_probe < cfg.probe_think
    steps: list[Step] = []

    def search(think: str, query: str) -> Generator[str, list[Doc], list[Doc]]:
        steps.append(Step(think, "search", query))
        steps[-1].docs = list((yield query))
        return steps[-1].docs

    need = f"I need {NEED[relations[0]]} of {cur.name}."
    if wasted:
        yield from search(need, _unrelated(world, q, rng).title)
        need = f"No match. {need}"
    think = need
    for hop, rel in enumerate(relations):
        stats.lookups += 1
        doc = _own_doc((yield from search(think, cur.name)), cur.id, cur.name)
        stats.first_try_hits += doc is not None
        tries = 0
        while doc is None:
            remaining = (1 if guess else len(relations) - hop) + 1  # this hop's search + the rest + answer
            if tries >= cfg.retries or len(steps) + remaining > cfg.max_turns:
                stats.dropped += 1
                return None
            tries += 1
            stats.retries += 1
            query = f"{cur.name} {TYPE_HINT[cur.type]}"
            doc = _own_doc((yield from search(f"No match. I need {NEED[rel]} of {cur.name}.", query)),
                           cur.id, cur.name)
            stats.retry_hits += doc is not None
        value = world.parse_doc(cur.type, doc.text)[rel]
        fact = FACT[rel].format(s=cur.name, v=value)
        if hop == len(relations) - 1:
            steps.append(Step(protocol.probe_think if probe else fact, "answer", value))
            break
        if guess:
            steps.append(Step(f"{fact} I guess.", "answer", _random_value(world, q, rng)))
            break
        cur = world.by_name(value)
        think = f"{fact} I need {NEED[relations[hop + 1]]} of {value}."
    stats.kept += 1  # noise shares count kept trajectories only
    stats.guess_eligible += guess_ok
    stats.guesses += guess
    stats.wasted_eligible += wasted_ok
    stats.wasted += wasted
    stats.probe_eligible += not guess
    stats.probe += probe
    return steps


def _own_doc(docs: list[Doc], entity_id: str, name: str) -> Doc | None:
    return next((d for d in docs if d.id == entity_id or d.title == name), None)


def _unrelated(world: World, q: Question, rng: random.Random) -> Doc:
    """A random document that is not on the question's chain and does not mention any chain entity."""
    names = [world.value_name(v) for v in q.metadata["chain"]]
    for _ in range(1000):
        d = rng.choice(world.docs)
        if d.id not in q.metadata["chain"] and not any(n in d.text for n in names):
            return d
    raise RuntimeError(f"oracle: no unrelated document found for {q.id!r}")


def _random_value(world: World, q: Question, rng: random.Random) -> str:
    """A wrong answer of the question's answer type (a guess)."""
    gold, kind = q.answers[0], RELATIONS[q.metadata["relations"][-1]][1]
    while True:
        if kind == "year":
            v = str(rng.randint(*world.cfg.year_range))
        else:
            v = rng.choice(world.of_type(kind)).name
        if v != gold:
            return v


Script = Generator[str, list[Doc], list[Step] | None]


def _run(scripts: list[Script], search: SearchFn) -> list[list[Step] | None]:
    """Drive many scripts in lockstep: one batched search call per round."""
    out: list[list[Step] | None] = [None] * len(scripts)
    pending: dict[int, str] = {}

    def advance(i: int, docs: list[Doc] | None) -> None:
        try:
            pending[i] = next(scripts[i]) if docs is None else scripts[i].send(docs)
        except StopIteration as stop:
            out[i] = stop.value

    for i in range(len(scripts)):
        advance(i, None)
    while pending:
        idx = list(pending)
        results = search([pending.pop(i) for i in idx])
        for i, docs in zip(idx, results, strict=True):
            advance(i, docs)
    return out


def _episode(q: Question, steps: list[Step], tokenizer: PreTrainedTokenizerBase, pieces: ChatPieces,
             protocol: AgentProtocol, cfg: OracleConfig, group: int, prompt: list[int] | None = None,
             obs_cache: dict[tuple[str, ...], list[int]] | None = None) -> Episode:
    """Tokenise steps like the rollout loop; `obs_cache` memoises observation ids per result list."""
    ep = Episode(q, group, list(prompt) if prompt is not None else prompt_ids(tokenizer, q.text, protocol))
    cache = obs_cache if obs_cache is not None else {}
    for i, s in enumerate(steps):
        text = protocol.action(s.think, s.kind, s.content)
        ids = encode(tokenizer, text)
        obs: list[int] = []
        if s.kind == "search":
            key = tuple(f"{d.id}\x00{d.title}\x00{d.text}" for d in s.docs)
            if key not in cache:
                cache[key] = observation_ids(tokenizer, pieces, s.docs, protocol, cfg.max_doc_tokens)
            obs = list(cache[key])
        ep.turns.append(Turn(i, ids, [0.0] * len(ids), text, s.kind, s.content, obs, list(s.docs)))
    ep.finish = "answer"
    return ep


def _retriever_search(retriever: Retriever, k: int) -> SearchFn:
    return lambda queries: retriever.search_batch(queries, k)


def oracle_episode(
    question: Question, world: World, retriever: Retriever, tokenizer: PreTrainedTokenizerBase,
    pieces: ChatPieces, protocol: AgentProtocol, rng: random.Random, noise: OracleConfig,
    stats: OracleStats | None = None, group: int = 0,
) -> Episode | None:
    """One scripted, tokenised trajectory through the real retriever (None if dropped; see module doc)."""
    stats = stats if stats is not None else OracleStats()
    script = _script(question, world, rng, noise, protocol, stats)
    steps = _run([script], _retriever_search(retriever, noise.k))[0]
    return None if steps is None else _episode(question, steps, tokenizer, pieces, protocol, noise, group)


def oracle_dataset(
    questions: list[Question], world: World, retriever: Retriever, tokenizer: PreTrainedTokenizerBase,
    pieces: ChatPieces | None = None, protocol: AgentProtocol | None = None, cfg: OracleConfig | None = None,
    samples_per_question: int = 2, seed: int = 0, stats: OracleStats | None = None,
) -> list[Episode]:
    """`samples_per_question` trajectories per question (searches batched across questions), in question
    order; dropped ones are left out and counted in `stats`. Deterministic in `seed`: each (question,
    sample) has its own random stream, so the result does not depend on batching."""
    protocol = protocol or AgentProtocol()
    cfg = cfg or OracleConfig()
    pieces = pieces or ChatPieces.from_tokenizer(tokenizer, protocol)
    stats = stats if stats is not None else OracleStats()
    if samples_per_question < 1:
        raise ValueError(f"oracle_dataset: samples_per_question={samples_per_question} must be >= 1")
    jobs = [(g, q, j) for g, q in enumerate(questions) for j in range(samples_per_question)]
    scripts = [_script(q, world, random.Random(f"{seed}:{q.id}:{j}"), cfg, protocol, stats)
               for _, q, j in jobs]
    results = _run(scripts, _retriever_search(retriever, cfg.k))
    prompts: dict[str, list[int]] = {}
    obs_cache: dict[tuple[str, ...], list[int]] = {}
    renamer = Renamer(world) if cfg.rename > 0 else None
    out = []
    for (g, q, j), steps in zip(jobs, results, strict=True):
        if steps is None:
            continue
        if renamer is not None:
            rng = random.Random(f"{seed}:{q.id}:{j}:rename")
            if rng.random() < cfg.rename:
                q, steps = renamer(q, steps, rng)
                stats.renamed += 1
        if q.text not in prompts:
            prompts[q.text] = prompt_ids(tokenizer, q.text, protocol)
        out.append(_episode(q, steps, tokenizer, pieces, protocol, cfg, g, prompts[q.text], obs_cache))
    return out


class Renamer:
    """Swap the entity names of a scripted trajectory for other names of the same type, consistently in
    the question, every think, query and answer, and every retrieved document (titles and texts). Names
    are matched whole and longest first, so a name that is part of a longer one is never split. The
    question's subject only ever becomes a train entity's name, so a held-out entity is still never the
    subject of an SFT question; other names may become any name (held-out names keep appearing in
    documents and as values, as without renaming)."""

    def __init__(self, world: World) -> None:
        self.by_type: dict[str, list[str]] = {}
        self.train_by_type: dict[str, list[str]] = {}
        for e in world.entities.values():
            self.by_type.setdefault(e.type, []).append(e.name)
            if e.id not in world.heldout:
                self.train_by_type.setdefault(e.type, []).append(e.name)
        self.type_of = {e.name: e.type for e in world.entities.values()}
        self.name_of = {e.id: e.name for e in world.entities.values()}
        names = sorted(self.type_of, key=len, reverse=True)
        self.pattern = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b")

    def mapping(self, texts: list[str], rng: random.Random, subject: str | None = None) -> dict[str, str]:
        """An injective map from the names found in `texts` to names of the same type (`subject` to a
        train entity's name)."""
        found = sorted({m.group(0) for t in texts for m in self.pattern.finditer(t)})
        out: dict[str, str] = {}
        if subject in found:
            out[subject] = rng.choice(self.train_by_type[self.type_of[subject]])
        for etype in sorted({self.type_of[n] for n in found}):
            mine = [n for n in found if self.type_of[n] == etype and n not in out]
            free = [n for n in self.by_type[etype] if n not in out.values()]
            out.update(zip(mine, rng.sample(free, len(mine)), strict=True))
        return out

    def __call__(self, q: Question, steps: list[Step], rng: random.Random) -> tuple[Question, list[Step]]:
        texts = [q.text, *q.answers, *(t for s in steps for t in (s.think, s.content)),
                 *(t for s in steps for d in s.docs for t in (d.title, d.text))]
        table = self.mapping(texts, rng, self.name_of.get(q.metadata.get("subject", "")))

        def sub(text: str) -> str:
            return self.pattern.sub(lambda m: table.get(m.group(0), m.group(0)), text)

        q2 = replace(q, text=sub(q.text), answers=[sub(a) for a in q.answers])
        steps2 = [Step(sub(s.think), s.kind, sub(s.content),
                       [replace(d, title=sub(d.title), text=sub(d.text)) for d in s.docs]) for s in steps]
        return q2, steps2


# ------------------------------------------------------------------- plain rendering (before a tokenizer)
def chatml_prompt(question: str, protocol: AgentProtocol | None = None) -> str:
    """The first generation prompt rendered as ChatML without a tokenizer (the tiny model's template)."""
    p = protocol or AgentProtocol()
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in p.messages(question)) + \
        "<|im_start|>assistant\n"


def render_plain(question: str, steps: list[Step], protocol: AgentProtocol | None = None,
                 pieces: ChatPieces = CHATML_PIECES) -> str:
    """A trajectory as text, ChatML and untruncated documents: what the tokenised episode decodes to
    when no document exceeds `max_doc_tokens`."""
    p = protocol or AgentProtocol()
    parts = [chatml_prompt(question, p)]
    for s in steps:
        parts.append(p.action(s.think, s.kind, s.content))
        if s.kind == "search":
            docs = "\n".join(p.doc_template.format(rank=r, title=d.title, text=d.text)
                             for r, d in enumerate(s.docs, 1)) or "No results."
            parts.append(observation_text(pieces, docs, p))
    return "".join(parts)


def world_search(world: World, k: int) -> SearchFn:
    """An in-memory stand-in for the retriever: the named entity's own document, then documents that
    mention the name. Used for tokenizer training text, before any index or tokenizer exists."""
    mentions: dict[str, list[Doc]] = {}
    names = [e.name for e in world.entities.values()]
    for d in world.docs:
        for n in names:
            if n in d.text and n != d.title:
                mentions.setdefault(n, []).append(d)

    def search(queries: list[str]) -> list[list[Doc]]:
        out = []
        for query in queries:
            own = [world.doc(world.by_name(query).id)] if world.has_name(query) else []
            out.append((own + mentions.get(query, []))[:k])
        return out

    return search


def tokenizer_corpus(world: World, n_trajectory_texts: int = 3000, protocol: AgentProtocol | None = None,
                     cfg: OracleConfig | None = None, seed: int = 0) -> list[str]:
    """Texts to train the tokenizer on before the model exists: protocol text, every document as it is
    shown in observations, and `n_trajectory_texts` oracle trajectories over train questions rendered
    as plain ChatML with `world_search` (the chicken-and-egg: no tokenizer is needed to make these)."""
    p, cfg = protocol or AgentProtocol(), cfg or OracleConfig()
    texts: list[str] = [p.system_prompt, " ".join(p.tags), p.probe_prefix()]
    texts += [p.doc_template.format(rank=1, title=d.title, text=d.text) for d in world.docs]
    train = world.questions["train"]
    if n_trajectory_texts > 0 and not train:
        raise ValueError("tokenizer_corpus: the world has no train questions")
    rng = random.Random(seed)
    picked = [train[i % len(train)] for i in rng.sample(range(max(len(train), n_trajectory_texts)),
                                                         n_trajectory_texts)] if n_trajectory_texts else []
    stats = OracleStats()
    scripts = [_script(q, world, random.Random(f"tok:{seed}:{i}"), cfg, p, stats)
               for i, q in enumerate(picked)]
    for q, steps in zip(picked, _run(scripts, world_search(world, cfg.k)), strict=True):
        if steps is not None:
            texts.append(render_plain(q.text, steps, p))
    return texts

