"""A seeded synthetic multi-hop world: entities, one-sentence documents and templated questions.

No model can know these facts, so a policy can only answer by searching. People (made-up first + last
names that share parts), companies, cities and countries (no documents); facts: birthplace, employer,
spouse (symmetric), company headquarters + founding year, city -> country. 20 % of people, companies and
cities are held out: they are never the subject of a train question (their documents stay in the corpus).
Everything is a function of `WorldConfig`, so the same config gives byte-identical files (`write_world`).
Design and sizes follow the feasibility prototype (docs/synthetic-testbed.md §1, §8).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import Stemmer

from igpo.io import atomic_path, atomic_write
from igpo.types import Doc, Question

FORMAT_VERSION = 1  # bump when generation changes, so cached worlds (keyed by cfg_hash) are rebuilt
SPLITS = ("train", "validation", "heldout")
ENTITY_TYPES = ("person", "company", "city", "country")
SYLLABLES = (
    "an", "dus", "zu", "ra", "ston", "ka", "bri", "li", "nash", "sa", "pe", "kel", "ten", "tal",
    "vin", "tor", "mi", "gar", "ba", "xan", "pek", "rel", "mo", "nu", "ro", "shal", "qua", "dor",
    "fen", "gi", "hul", "jor", "lu", "mer", "ob", "pra", "sil", "tu", "vek", "zim",
)
COMPANY_SUFFIXES = ("Corp", "Labs", "Group", "Works", "Systems")
# Words a name must never be: template words and English stopwords of name length.
_RESERVED = frozenset(
    "born works work married founded headquartered city company country spouse year corp labs group systems "
    "about above after again against been before being below between both does doing down during each from "
    "further have having here hers into itself more most once only other ours over same should some such "
    "than that their theirs them then there these they this those through under until very were what when "
    "where which while whom with would your yours".split()
)

# relation -> (subject type, value type); "year" values are the year itself, not an entity.
RELATIONS: dict[str, tuple[str, str]] = {
    "born": ("person", "city"),
    "employer": ("person", "company"),
    "spouse": ("person", "person"),
    "hq": ("company", "city"),
    "founded": ("company", "year"),
    "country": ("city", "country"),
}


@dataclass(frozen=True)
class Template:
    """A question template: follow `relations` from a subject of `subject_type`; `text` has `{s}`."""

    name: str
    subject_type: str
    relations: tuple[str, ...]
    text: str

    @property
    def hops(self) -> int:
        return len(self.relations)

    @property
    def answer_type(self) -> str:
        return RELATIONS[self.relations[-1]][1]


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("born", "person", ("born",), "Where was {s} born?"),
    Template("works", "person", ("employer",), "Which company does {s} work for?"),
    Template("spouse", "person", ("spouse",), "Who is {s} married to?"),
    Template("hq", "company", ("hq",), "Where is {s} headquartered?"),
    Template("founded", "company", ("founded",), "In which year was {s} founded?"),
    Template("country", "city", ("country",), "Which country is {s} in?"),
    Template("born_country", "person", ("born", "country"), "In which country was {s} born?"),
    Template("employer_hq", "person", ("employer", "hq"),
             "Where is the company that {s} works for headquartered?"),
    Template("employer_founded", "person", ("employer", "founded"),
             "In which year was the company that {s} works for founded?"),
    Template("spouse_born", "person", ("spouse", "born"), "Where was the spouse of {s} born?"),
    Template("spouse_employer", "person", ("spouse", "employer"),
             "Which company does the spouse of {s} work for?"),
    Template("hq_country", "company", ("hq", "country"), "In which country is {s} headquartered?"),
    Template("spouse_employer_hq", "person", ("spouse", "employer", "hq"),
             "Where is the company that the spouse of {s} works for headquartered?"),
    Template("spouse_born_country", "person", ("spouse", "born", "country"),
             "In which country was the spouse of {s} born?"),
    Template("employer_hq_country", "person", ("employer", "hq", "country"),
             "In which country is the company that {s} works for headquartered?"),
    Template("spouse_employer_founded", "person", ("spouse", "employer", "founded"),
             "In which year was the company that the spouse of {s} works for founded?"),
)}
DEFAULT_TEMPLATES = tuple(n for n, t in TEMPLATES.items() if t.hops <= 2)
THREE_HOP_TEMPLATES = tuple(n for n, t in TEMPLATES.items() if t.hops == 3)
DISTRACTORS: dict[str, tuple[str, ...]] = {  # extra sentences; {x} = a random entity of the field's type
    "person": ("{name} once visited {city}.", "{name} has a friend named {person}."),
    "company": ("{name} has a branch in {city}.", "{name} partners with {company}."),
    "city": ("{name} lies near {city}.", "{name} hosts an office of {company}."),
}


@dataclass(frozen=True)
class WorldConfig:
    """Sizes, templates and document sentences of the world (Hydra sets these)."""

    seed: int = 0
    n_people: int = 500
    n_companies: int = 120
    n_cities: int = 60
    n_countries: int = 12
    n_first_names: int = 220
    n_last_names: int = 220
    heldout_frac: float = 0.2  # share of people/companies/cities never the subject of a train question
    validation_frac: float = 0.2  # share of each template's held-out questions moved to `validation`
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    three_hop: bool = False  # add the 3-hop templates (THREE_HOP_TEMPLATES)
    distractor_sentences: int = 0  # extra unrelated sentences per doc (0 = the prototype's 1-sentence docs)
    year_range: tuple[int, int] = (1900, 2020)
    person_doc: str = "{name} was born in {born}, works for {employer} and is married to {spouse}."
    company_doc: str = "{name} was founded in {founded} and is headquartered in {hq}."
    city_doc: str = "{name} is a city in {country}."

    def __post_init__(self) -> None:  # Hydra passes lists; keep the config hashable and validated
        object.__setattr__(self, "templates", tuple(self.templates))
        object.__setattr__(self, "year_range", tuple(self.year_range))
        _validate(self)

    @property
    def active_templates(self) -> tuple[Template, ...]:
        names = self.templates + (tuple(n for n in THREE_HOP_TEMPLATES if n not in self.templates)
                                  if self.three_hop else ())
        return tuple(TEMPLATES[n] for n in names)

    def doc_template(self, entity_type: str) -> str:
        return {"person": self.person_doc, "company": self.company_doc, "city": self.city_doc}[entity_type]


def _validate(cfg: WorldConfig) -> None:
    def bad(name: str, why: str) -> ValueError:
        return ValueError(f"WorldConfig.{name}={getattr(cfg, name)!r}: {why}")

    for name in ("n_people", "n_companies", "n_cities", "n_countries", "n_first_names", "n_last_names"):
        if getattr(cfg, name) < 2:
            raise bad(name, "need at least 2")
    if cfg.n_people % 2:
        raise bad("n_people", "must be even (people are paired as spouses)")
    if cfg.n_first_names * cfg.n_last_names < cfg.n_people:
        raise bad("n_people", "more people than first x last name combinations")
    for name in ("heldout_frac", "validation_frac"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise bad(name, "must be in (0, 1)")
    unknown = [n for n in cfg.templates if n not in TEMPLATES]
    if unknown or not cfg.templates:
        raise bad("templates", f"unknown {unknown}; choose from {sorted(TEMPLATES)}")
    if len(cfg.year_range) != 2 or cfg.year_range[0] >= cfg.year_range[1]:
        raise bad("year_range", "need (first, last) with first < last")
    if cfg.distractor_sentences < 0:
        raise bad("distractor_sentences", "must be >= 0")
    for etype in ("person", "company", "city"):
        fields = set(re.findall(r"{(\w+)}", cfg.doc_template(etype)))
        want = {"name"} | {r for r, (s, _) in RELATIONS.items() if s == etype}
        if fields != want:
            raise bad(f"{etype}_doc", f"must use exactly the fields {sorted(want)}")


@dataclass(frozen=True)
class Entity:
    """One entity; `facts` maps a relation to an entity id (or, for `founded`, the year as text)."""

    id: str
    type: str
    name: str
    facts: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    """The built world: entities, the corpus (one document per person/company/city) and question splits."""

    cfg: WorldConfig
    entities: dict[str, Entity]
    docs: list[Doc]
    questions: dict[str, list[Question]]
    heldout: frozenset[str]  # ids of held-out entities (never a train subject)

    def __post_init__(self) -> None:
        self._by_name = {e.name: e for e in self.entities.values()}
        self._docs = {d.id: d for d in self.docs}
        self._questions = {q.id: q for qs in self.questions.values() for q in qs}

    def by_name(self, name: str) -> Entity:
        if name not in self._by_name:
            raise KeyError(f"World: no entity named {name!r}")
        return self._by_name[name]

    def question(self, question_id: str) -> Question:
        """The world's own question (with its chain metadata) by id, e.g. for one read back from a file."""
        if question_id not in self._questions:
            raise KeyError(f"World: no question with id {question_id!r} (built from another config?)")
        return self._questions[question_id]

    def has_name(self, name: str) -> bool:
        return name in self._by_name

    def of_type(self, entity_type: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.type == entity_type]

    def doc(self, entity_id: str) -> Doc:
        return self._docs[entity_id]

    def value_name(self, value: str) -> str:
        """Display name of a fact value (an entity id -> its name; a year stays as it is)."""
        return self.entities[value].name if value in self.entities else value

    def parse_doc(self, entity_type: str, text: str) -> dict[str, str]:
        """Read the facts (relation -> value name) back from a document's text; used by the oracle."""
        return parse_facts(self.cfg, entity_type, text)


def parse_facts(cfg: WorldConfig, entity_type: str, text: str) -> dict[str, str]:
    """Facts stated by the first sentence of an `entity_type` document (ValueError if it does not match)."""
    m = _fact_regex(cfg.doc_template(entity_type)).match(text)
    if m is None:
        raise ValueError(f"parse_facts: {entity_type} document does not match its template: {text!r}")
    return {k: v for k, v in m.groupdict().items() if k != "name"}


@functools.lru_cache(maxsize=32)
def _fact_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"{(\w+)}", template)
    out = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))
    return re.compile(out)


def cfg_hash(cfg: WorldConfig) -> str:
    """Content fingerprint of a config (and the generator version), for caching written worlds."""
    blob = json.dumps({"v": FORMAT_VERSION, "cfg": asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- build
def _words(rng: random.Random, n: int, taken: set[str], stem: Stemmer.Stemmer) -> list[str]:
    """n new capitalised syllable words, distinct from `taken` even after stemming."""
    out: list[str] = []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            return out
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
        key = stem.stemWord(word)
        if word in _RESERVED or key in taken or word in taken:
            continue
        taken.update((key, word))
        out.append(word.capitalize())
    raise ValueError(f"WorldConfig: ran out of distinct 2-3 syllable words ({len(out)} of {n} found); "
                     "ask for fewer names (n_first_names, n_last_names, n_companies, n_cities, n_countries)")


def _entities(cfg: WorldConfig, rng: random.Random) -> dict[str, Entity]:
    stem, taken = Stemmer.Stemmer("english"), set()
    first, last = _words(rng, cfg.n_first_names, taken, stem), _words(rng, cfg.n_last_names, taken, stem)
    company_words = _words(rng, cfg.n_companies, taken, stem)
    city_names = _words(rng, cfg.n_cities, taken, stem)
    # "-ia"/"-nia" endings never come out of the syllables, so country names stay distinct from all words
    country_words = _words(rng, cfg.n_countries, taken, stem)
    country_names = [w + ("nia" if w[-1] in "aeiou" else "ia") for w in country_words]
    pairs = rng.sample(range(cfg.n_first_names * cfg.n_last_names), cfg.n_people)
    people = [f"{first[p // cfg.n_last_names]} {last[p % cfg.n_last_names]}" for p in pairs]

    ids = {t: [f"{t}_{i:04d}" for i in range(n)] for t, n in
           (("person", cfg.n_people), ("company", cfg.n_companies), ("city", cfg.n_cities),
            ("country", cfg.n_countries))}
    # every country gets a city first, then the rest at random
    city_country = [ids["country"][i % cfg.n_countries] for i in range(cfg.n_cities)]
    rng.shuffle(city_country)
    order = rng.sample(ids["person"], cfg.n_people)
    spouse = {}
    for a, b in zip(order[0::2], order[1::2], strict=True):
        spouse[a], spouse[b] = b, a
    ents: dict[str, Entity] = {}
    for i, pid in enumerate(ids["person"]):
        ents[pid] = Entity(pid, "person", people[i], {
            "born": rng.choice(ids["city"]), "employer": rng.choice(ids["company"]), "spouse": spouse[pid]})
    lo, hi = cfg.year_range
    for i, cid in enumerate(ids["company"]):
        name = f"{company_words[i]} {rng.choice(COMPANY_SUFFIXES)}"
        facts = {"hq": rng.choice(ids["city"]), "founded": str(rng.randint(lo, hi))}
        ents[cid] = Entity(cid, "company", name, facts)
    for i, tid in enumerate(ids["city"]):
        ents[tid] = Entity(tid, "city", city_names[i], {"country": city_country[i]})
    for i, kid in enumerate(ids["country"]):
        ents[kid] = Entity(kid, "country", country_names[i])
    return ents


def _docs(cfg: WorldConfig, ents: dict[str, Entity], rng: random.Random) -> list[Doc]:
    by_type = {t: [e.name for e in ents.values() if e.type == t] for t in ENTITY_TYPES}
    docs = []
    for e in ents.values():
        if e.type == "country":
            continue
        values = {rel: ents[v].name if v in ents else v for rel, v in e.facts.items()}
        sentences = [cfg.doc_template(e.type).format(name=e.name, **values)]
        for _ in range(cfg.distractor_sentences):
            tpl = rng.choice(DISTRACTORS[e.type])
            slot = re.findall(r"{(person|company|city)}", tpl)[0]
            other = rng.choice([n for n in by_type[slot] if n != e.name])
            sentences.append(tpl.format(name=e.name, **{slot: other}))
        docs.append(Doc(id=e.id, title=e.name, text=" ".join(sentences)))
    return docs


def _question(t: Template, subject: Entity, ents: dict[str, Entity], split: str) -> Question:
    chain = [subject.id]
    for rel in t.relations:
        chain.append(ents[chain[-1]].facts[rel])
    answer = ents[chain[-1]].name if chain[-1] in ents else chain[-1]
    meta = {"template": t.name, "hops": t.hops, "split": split, "subject": subject.id,
            "relations": list(t.relations), "chain": chain, "docs": chain[:-1], "answer_type": t.answer_type}
    return Question(id=f"synth-{t.name}-{subject.id}", text=t.text.format(s=subject.name), answers=[answer],
                    data_source=f"synth_{t.hops}hop", metadata=meta)


def build_world(cfg: WorldConfig) -> World:
    """Build the whole world in memory (deterministic in `cfg`; the default size takes ~0.15 s)."""
    rng = random.Random(cfg.seed)
    ents = _entities(cfg, rng)
    heldout: set[str] = set()
    for etype in ("person", "company", "city"):
        members = sorted(e.id for e in ents.values() if e.type == etype)
        heldout.update(rng.sample(members, round(cfg.heldout_frac * len(members))))
    docs = _docs(cfg, ents, rng)
    splits: dict[str, list[Question]] = {s: [] for s in SPLITS}
    for t in cfg.active_templates:
        subjects = [e for e in ents.values() if e.type == t.subject_type]
        splits["train"] += [_question(t, e, ents, "train") for e in subjects if e.id not in heldout]
        held = [e for e in subjects if e.id in heldout]
        val = set(e.id for e in rng.sample(held, round(cfg.validation_frac * len(held))))
        for e in held:
            split = "validation" if e.id in val else "heldout"
            splits[split].append(_question(t, e, ents, split))
    for qs in splits.values():
        rng.shuffle(qs)
    return World(cfg, ents, docs, splits, frozenset(heldout))


# ---------------------------------------------------------------------------------------------- write
@dataclass(frozen=True)
class WorldFiles:
    """Paths of a written world: the corpus, the manifest, and per split a jsonl and an IGPO parquet."""

    root: Path
    corpus: Path
    manifest: Path
    jsonl: dict[str, Path]
    parquet: dict[str, Path]


def world_files(out_dir: str | Path) -> WorldFiles:
    root = Path(out_dir)
    return WorldFiles(root, root / "corpus.jsonl", root / "world.json",
                      {s: root / f"{s}.jsonl" for s in SPLITS}, {s: root / f"{s}.parquet" for s in SPLITS})


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _parquet_rows(questions: list[Question]) -> list[dict[str, Any]]:
    return [{
        "data_source": q.data_source,
        "prompt": [{"content": q.text, "role": "user"}],
        "ability": "search & question answering",
        "reward_model": {"ground_truth": list(q.answers), "style": "rule"},
        "extra_info": {"index": q.id, **{k: q.metadata[k] for k in _EXTRA_FIELDS}},
    } for q in questions]


_EXTRA_FIELDS = ("split", "template", "hops", "subject", "relations", "chain", "docs", "answer_type")


def parquet_schema() -> Any:
    """The IGPO question schema (the real datasets' layout; ground_truth is a list of aliases here)."""
    import pyarrow as pa

    s, ls = pa.string(), pa.list_(pa.string())
    return pa.schema([
        ("data_source", s),
        ("prompt", pa.list_(pa.struct([("content", s), ("role", s)]))),
        ("ability", s),
        ("reward_model", pa.struct([("ground_truth", ls), ("style", s)])),
        ("extra_info", pa.struct([("index", s), ("split", s), ("template", s), ("hops", pa.int64()),
                                  ("subject", s), ("relations", ls), ("chain", ls), ("docs", ls),
                                  ("answer_type", s)])),
    ])


def _write_parquet(path: Path, questions: list[Question]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(_parquet_rows(questions), schema=parquet_schema()), tmp)


def write_world(world: World, out_dir: str | Path) -> WorldFiles:
    """Write corpus.jsonl (Search-R1 `{"id","contents"}`), per split `<split>.jsonl` and `<split>.parquet`,
    then world.json (config, hash, counts) last, so a present manifest means a complete world."""
    files = world_files(out_dir)
    files.root.mkdir(parents=True, exist_ok=True)
    corpus = ({"id": d.id, "contents": f'"{d.title}"\n{d.text}'} for d in world.docs)
    atomic_write(files.corpus, _jsonl(corpus))
    for split, qs in world.questions.items():
        atomic_write(files.jsonl[split], _jsonl(
            {"id": q.id, "question": q.text, "answers": q.answers, "data_source": q.data_source,
             "metadata": q.metadata} for q in qs))
        _write_parquet(files.parquet[split], qs)
    manifest = {"cfg_hash": cfg_hash(world.cfg), "cfg": asdict(world.cfg), "counts": world_counts(world)}
    atomic_write(files.manifest, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return files


def ensure_world(cfg: WorldConfig, cache_root: str | Path) -> WorldFiles:
    """The written world for `cfg` under `cache_root/world-<cfg_hash>`, built only if not there yet."""
    files = world_files(Path(cache_root) / f"world-{cfg_hash(cfg)}")
    if not files.manifest.exists():
        write_world(build_world(cfg), files.root)
    return files


def world_counts(world: World) -> dict[str, Any]:
    """Entity, document and per-split/per-template question counts (for manifests and reports)."""
    per_split = {s: {} for s in SPLITS}
    for split, qs in world.questions.items():
        for q in qs:
            t = q.metadata["template"]
            per_split[split][t] = per_split[split].get(t, 0) + 1
    return {"entities": {t: len(world.of_type(t)) for t in ENTITY_TYPES}, "docs": len(world.docs),
            "questions": {s: len(qs) for s, qs in world.questions.items()}, "per_template": per_split}
