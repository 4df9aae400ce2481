"""Rollout bookkeeping with a scripted generator and a fixed retriever (pure logic; the real engines
are exercised in tests/integration): the training sequence is exactly the sampled tokens plus the
observation tokens, with turn ids and a loss mask, under two different chat templates."""

import pytest

from igpo.generator.base import Generation, SamplingConfig
from igpo.prompts import ChatPieces, encode, prompt_text
from igpo.rollout import RolloutConfig, RolloutRunner
from igpo.types import Doc, Question

ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ScriptedGenerator:
    """Returns, for the i-th call, script[i] for every prompt (or per-prompt lists)."""

    def __init__(self, tokenizer, script):
        self.tok, self.script, self.calls = tokenizer, script, []

    def setup(self):
        pass

    def close(self):
        pass

    def generate(self, prompts, sampling):
        texts = self.script[len(self.calls)]
        self.calls.append(prompts)
        texts = texts if isinstance(texts, list) else [texts] * len(prompts)
        out = []
        for t in texts:
            ids = encode(self.tok, t)
            out.append(Generation(ids, [-0.5] * len(ids), t, "length" if t.endswith("LEN") else "stop"))
        return out


class FixedRetriever:
    def __init__(self):
        self.calls = []

    def setup(self):
        pass

    def close(self):
        pass

    def search_batch(self, queries, k):
        self.calls.append(list(queries))
        return [[Doc(f"d{i}", q, f"{q} was born in Garmi.") for i in range(k)] for q in queries]


@pytest.fixture(params=["chatml", "zephyr"])
def tokenizer(request, tiny_tokenizer):
    if request.param == "chatml":
        return tiny_tokenizer
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = ZEPHYR
    return tok


def test_two_turn_episode_bookkeeping(tokenizer):
    search = "<think>I need X.</think><search>Andus Zuraston</search>"
    answer = "<think>Found.</think><answer>Garmi</answer>"
    gen, ret = ScriptedGenerator(tokenizer, [search, answer]), FixedRetriever()
    runner = RolloutRunner(gen, ret, tokenizer, config=RolloutConfig(max_turns=4, search_k=2))
    q = Question("q1", "Where was Andus Zuraston born?", ["Garmi"])
    episodes, stats = runner.run([q], group_size=3, sampling=SamplingConfig())
    assert len(episodes) == 3 and {e.group for e in episodes} == {0}
    assert len(ret.calls) == 1 and ret.calls[0] == ["Andus Zuraston"] * 3  # one batched search per turn
    ep = episodes[0]
    assert ep.finish == "answer" and ep.answer == "Garmi" and [t.kind for t in ep.turns] == ["search", "answer"]
    pieces = ChatPieces.from_tokenizer(tokenizer)
    obs = (f"{pieces.assistant_end}{pieces.user_open}<information>(1) Andus Zuraston. Andus Zuraston was born in "
           f"Garmi.\n(2) Andus Zuraston. Andus Zuraston was born in Garmi.</information>{pieces.user_close}")
    rendered = prompt_text(tokenizer, q.text) + search + obs + answer
    assert tokenizer.decode(ep.token_ids) == rendered
    # loss mask: exactly the sampled action tokens
    sampled = [tid for tid, m in zip(ep.token_ids, ep.loss_mask, strict=True) if m]
    assert sampled == ep.turns[0].action_ids + ep.turns[1].action_ids
    n_prompt, n_a0, n_obs = len(ep.prompt_ids), len(ep.turns[0].action_ids), len(ep.turns[0].obs_ids)
    assert ep.turn_ids == [-1] * n_prompt + [0] * (n_a0 + n_obs) + [1] * len(ep.turns[1].action_ids)
    assert ep.probe_boundaries == [n_prompt, n_prompt + n_a0 + n_obs]
    # the second generation call saw exactly the first context
    assert gen.calls[1][0] == ep.token_ids[: ep.probe_boundaries[1]]
    assert stats.searches == 3


def test_finish_reasons(tiny_tokenizer):
    search = "<think>x</think><search>Q</search>"
    script = [
        [search, search, "no tags at all", search],
        [search, "<think>x</think><answer>K</answer>", "<think>x</think><answer>K LEN"],
        [search],
    ]
    gen = ScriptedGenerator(tiny_tokenizer, script)
    runner = RolloutRunner(gen, FixedRetriever(), tiny_tokenizer, config=RolloutConfig(max_turns=3, search_k=1))
    qs = [Question("a", "A?", ["K"]), Question("b", "B?", ["K"])]
    eps, _ = runner.run(qs, group_size=2, sampling=SamplingConfig())
    assert [e.finish for e in eps] == ["max_turns", "answer", "malformed", "malformed"]
    assert [e.group for e in eps] == [0, 0, 1, 1]
    assert len(eps[0].turns) == 3 and eps[0].turns[-1].obs_ids == []  # no search after the last turn
    assert eps[3].turns[-1].kind == "malformed"  # cut by the length limit: malformed, not parsed
    assert len(gen.calls[1]) == 3 and len(gen.calls[2]) == 1  # only active episodes are generated for


def test_context_budget_ends_episode(tiny_tokenizer):
    search = "<think>x</think><search>Q</search>"
    gen = ScriptedGenerator(tiny_tokenizer, [search, search])
    cfg = RolloutConfig(max_turns=4, search_k=2, max_context_tokens=120)
    eps, _ = RolloutRunner(gen, FixedRetriever(), tiny_tokenizer, config=cfg).run(
        [Question("a", "A?", ["K"])], 1, SamplingConfig(max_new_tokens=16))
    assert eps[0].finish == "max_turns" and len(gen.calls) < 4


class SeedRecorder(ScriptedGenerator):
    def generate(self, prompts, sampling):
        self.seeds = [*getattr(self, "seeds", []), sampling.seed]
        return super().generate(prompts, sampling)


def test_each_turn_samples_with_its_own_seed(tiny_tokenizer):
    """Without per-turn seeds, prompt i of every turn would draw from the same stream (seed + i)."""
    from igpo.rollout import TURN_SEED_STRIDE, turn_sampling

    search = "<think>x</think><search>Q</search>"
    gen = SeedRecorder(tiny_tokenizer, [search, search, search])
    runner = RolloutRunner(gen, FixedRetriever(), tiny_tokenizer, config=RolloutConfig(max_turns=3, search_k=1))
    runner.run([Question("a", "A?", ["K"])], 2, SamplingConfig(seed=77))
    assert gen.seeds == [77, 77 + TURN_SEED_STRIDE, 77 + 2 * TURN_SEED_STRIDE]
    unseeded = SeedRecorder(tiny_tokenizer, [search, search])
    RolloutRunner(unseeded, FixedRetriever(), tiny_tokenizer, config=RolloutConfig(max_turns=2, search_k=1)).run(
        [Question("a", "A?", ["K"])], 1, SamplingConfig())
    assert unseeded.seeds == [None, None]
    assert turn_sampling(SamplingConfig(seed=5, temperature=0.7), 2) == SamplingConfig(
        seed=5 + 2 * TURN_SEED_STRIDE, temperature=0.7)


class EmptyForSome(FixedRetriever):
    def search_batch(self, queries, k):
        full = super().search_batch(queries, k)
        return [[] if "nothing" in q else docs for q, docs in zip(queries, full, strict=True)]


def test_empty_search_results_are_counted(tiny_tokenizer):
    script = [["<think>x</think><search>nothing here</search>", "<think>x</think><search>Andus</search>"]]
    runner = RolloutRunner(ScriptedGenerator(tiny_tokenizer, script + [["<answer>K</answer>"] * 2]), EmptyForSome(),
                           tiny_tokenizer, config=RolloutConfig(max_turns=2, search_k=1))
    eps, stats = runner.run([Question("a", "A?", ["K"])], 2, SamplingConfig())
    assert stats.searches == 2 and stats.empty_results == 1
    assert eps[0].turns[0].docs == [] and eps[0].turns[0].obs_ids  # still observed ("No results.")


class WrongCount(FixedRetriever):
    def search_batch(self, queries, k):
        return super().search_batch(queries, k)[:-1]


def test_retriever_with_wrong_number_of_result_lists_is_a_clear_error(tiny_tokenizer):
    from igpo.rollout import RetrieverContractError

    gen = ScriptedGenerator(tiny_tokenizer, ["<think>x</think><search>Q</search>"])
    runner = RolloutRunner(gen, WrongCount(), tiny_tokenizer, config=RolloutConfig(max_turns=2, search_k=1))
    with pytest.raises(RetrieverContractError, match=r"WrongCount.search_batch returned 2 result lists for 3 queries"):
        runner.run([Question("a", "A?", ["K"])], 3, SamplingConfig())


class _RecordingRunner:
    def __init__(self):
        self.samplings = []

    def run(self, questions, group_size, sampling, group_offset=0):
        from igpo.types import Episode, Turn

        self.samplings.append(sampling)
        return [Episode(questions[0], 0, [1, 2], [Turn(0, [3], [0.0], "x", "answer", "A")], "answer")], None


def test_sampled_validation_is_seeded_by_step_and_chunk(tiny_tokenizer):
    """Sampled validation (val_temperature > 0) is a pure function of (seed, step, chunk): a run resumed
    before a validation samples the same episodes; greedy validation carries no seed."""
    from igpo.data.module import RolloutDataModule, _ValStream

    def seeds(temperature, step, seed=0):
        dm = RolloutDataModule([], None, None, "unused", val_temperature=temperature, val_batch_size=2, seed=seed)
        dm.val_set = [Question(str(i), "Q?", ["A"]) for i in range(5)]
        dm.runner, dm.tokenizer, dm.steps_done = _RecordingRunner(), tiny_tokenizer, step
        list(_ValStream(dm))
        assert all(s.temperature == temperature for s in dm.runner.samplings)
        return [s.seed for s in dm.runner.samplings]

    first = seeds(0.8, step=3)
    assert len(first) == 3 and len(set(first)) == 3 and all(s is not None for s in first)
    assert seeds(0.8, step=3) == first  # the same after a restart
    assert seeds(0.8, step=6) != first and seeds(0.8, step=3, seed=1) != first
    assert seeds(0.0, step=3) == [None, None, None]


def test_keep_engine_survives_teardown_until_close() -> None:
    """`keep_engine` lets a caller evaluate after trainer.fit (which tears the datamodule down) without restarting
    the engine; close() then shuts the generator and the retriever down once."""
    from igpo.data.module import RolloutDataModule

    class Closable:
        closed = 0

        def close(self) -> None:
            self.closed += 1

    gen, ret = Closable(), Closable()
    dm = RolloutDataModule([], gen, ret, "unused")
    dm.runner = object()
    dm.keep_engine = True
    dm.teardown("fit")
    assert dm.runner is not None and gen.closed == ret.closed == 0
    dm.close()
    assert dm.runner is None and gen.closed == ret.closed == 1
    dm.close()  # idempotent
    dm.runner = object()
    dm.keep_engine = False
    dm.teardown("fit")  # the default: teardown closes
    assert dm.runner is None and gen.closed == ret.closed == 2
