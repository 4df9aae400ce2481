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
    runner = RolloutRunner(gen, ret, tokenizer, config=RolloutConfig(max_turns=4, top_k=2))
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
    runner = RolloutRunner(gen, FixedRetriever(), tiny_tokenizer, config=RolloutConfig(max_turns=3, top_k=1))
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
    cfg = RolloutConfig(max_turns=4, top_k=2, max_context_tokens=120)
    eps, _ = RolloutRunner(gen, FixedRetriever(), tiny_tokenizer, config=cfg).run(
        [Question("a", "A?", ["K"])], 1, SamplingConfig(max_new_tokens=16))
    assert eps[0].finish == "max_turns" and len(gen.calls) < 4
