"""Token bookkeeping and the probe contract on real vocabularies: SmolLM2-135M-Instruct's (49,152) and
Qwen2.5's (151,665), where the `>` of a tag merges with an answer's first letters.

- probe: (prefix, gold, suffix) is exactly the encoding of the whole probe text, and the gold run is the
  smallest run of tokens covering the answer's characters (at most the tag's `>` before it and the start
  of `</answer>` after it ride along in merged tokens);
- rollout: an episode built by the real `RolloutRunner` (a scripted policy that emits the tokenizer's own
  tokens for an action, real bm25s search over a small corpus) decodes to the rendered conversation,
  keeps the sampled ids as they are, masks observations from the loss and numbers turns right.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from igpo.algorithm.probe import probe_inputs_from_episodes
from igpo.generator.base import Generation, SamplingConfig
from igpo.prompts import (
    AgentProtocol,
    ChatPieces,
    encode,
    format_docs,
    observation_text,
    probe_token_parts,
    prompt_text,
)
from igpo.retriever.bm25 import BM25Retriever
from igpo.rollout import RolloutConfig, RolloutRunner
from igpo.types import Question, RolloutBatch

pytestmark = pytest.mark.slow
TOKENIZERS = ["smollm2_tokenizer", "qwen_tokenizer"]
ANSWERS = [
    "Fennusil", "Garmi", "1948", "New York", "Paris", "São Paulo", "Zürich", "Ångström", "Éamon de Valera",
    "naïve", "Dvořák", "Łódź", "Kraków", "Ñandú", "François Mitterrand", "Müller-Lüdenscheidt", "O'Brien",
    "Washington, D.C.", "3.14", "-5 °C", "(1987)", "x", "“quoted”", "a  b", "東京", "Andus Zuraston Garmi",
    "the 19th century", "Fennusil.", "'s", "<b>", ">",
]
MERGING = ["Fennusil", "Éamon de Valera", "1948", "Zürich"]  # bookkeeping cases: tag + first letters


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_probe_span_is_the_exact_encoding_and_minimal(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    protocol, pieces = AgentProtocol(), ChatPieces.from_tokenizer(tok)
    head, tail = protocol.probe_prefix(), protocol.answer[1] + pieces.assistant_end
    merged_with_tag = []
    for gold in ANSWERS:
        text = head + gold + tail
        prefix, gold_ids, suffix = probe_token_parts(tok, pieces, gold, protocol)
        assert prefix + gold_ids + suffix == encode(tok, text), gold
        p_txt, g_txt, s_txt = _decode(tok, prefix), _decode(tok, gold_ids), _decode(tok, suffix)
        assert p_txt + g_txt + s_txt == text, gold
        g0, g1 = len(head), len(head) + len(gold)
        assert len(p_txt) <= g0 and len(p_txt) + len(g_txt) >= g1, f"{gold!r}: gold run does not cover it"
        lead, trail = text[len(p_txt): g0], text[g1: len(p_txt) + len(g_txt)]
        assert head.endswith(lead) and lead in ("", ">"), f"{gold!r}: gold run starts with {lead!r}"
        assert tail.startswith(trail) and len(trail) <= 2, f"{gold!r}: gold run ends with {trail!r}"
        # minimal: dropping the first or the last gold token uncovers some of the answer's characters
        # (compared as text: a token holding part of a multi-byte character decodes to U+FFFD)
        assert not head.startswith(_decode(tok, prefix + gold_ids[:1])), gold
        assert not _decode(tok, prefix + gold_ids[:-1]).startswith(head + gold), gold
        merged_with_tag += [gold] * (lead == ">")
    if name == "qwen_tokenizer":  # `<answer>Fennusil` is '<' 'answer' '>F' 'enn' …
        assert "Fennusil" in merged_with_tag and len(merged_with_tag) >= 5, merged_with_tag


@pytest.mark.parametrize("name", TOKENIZERS)
def test_chat_pieces_and_prompts_from_the_real_templates(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(name)
    pieces = ChatPieces.from_tokenizer(tok)
    assert pieces == ChatPieces("<|im_end|>", "\n<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    ours = prompt_text(tok, "Where was Fennusil born?")
    assert ours.startswith("<|im_start|>system\nYou are a research assistant.")
    assert ours.endswith("<|im_start|>user\nQuestion: Where was Fennusil born?<|im_end|>\n<|im_start|>assistant\n")
    # without a system prompt the template's own default system message appears (both templates have one)
    default = prompt_text(tok, "Where?", AgentProtocol(system_prompt=""))
    expected = "You are Qwen, created by Alibaba Cloud." if name == "qwen_tokenizer" else "You are a helpful AI"
    assert default.startswith(f"<|im_start|>system\n{expected}")


class ScriptedPolicy:
    """A generator that emits, per call, the tokenizer's own tokens for a scripted action text (a model
    writes an action as one token stream; it never sees the tag and the content tokenised apart)."""

    def __init__(self, tok, actions: list[str]) -> None:
        self.tok, self.actions, self.calls = tok, actions, 0

    def setup(self) -> None:
        pass

    def close(self) -> None:
        pass

    def generate(self, prompts, sampling):
        text = self.actions[self.calls]
        self.calls += 1
        ids = encode(self.tok, text)
        return [Generation(list(ids), [-0.25] * len(ids), text, "stop") for _ in prompts]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    docs = [f"\"{n}\"\n{n} was born in {city} in 1948 and studied at the University of {city}."
            for n, city in [("Fennusil", "Zürich"), ("Éamon de Valera", "New York"), ("Andus Zuraston", "Garmi"),
                            ("Zürich", "Kraków"), ("1948", "São Paulo")]]
    path.write_text("".join(json.dumps({"id": str(i), "contents": d}) + "\n" for i, d in enumerate(docs)))
    r = BM25Retriever(path)
    r.setup()
    yield r
    r.close()


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("entity", MERGING)
def test_episode_bookkeeping_token_in_token_out(name: str, entity: str, retriever, request) -> None:
    tok = request.getfixturevalue(name)
    protocol = AgentProtocol()
    search = f"<think>I need to look up {entity}.</think><search>{entity}</search>"
    answer = f"<think>Found it.</think><answer>{entity}</answer>"
    runner = RolloutRunner(ScriptedPolicy(tok, [search, answer]), retriever, tok, protocol,
                           RolloutConfig(max_turns=3, search_k=2, max_doc_tokens=24, max_context_tokens=4096))
    assert runner.pieces == ChatPieces.from_tokenizer(tok, protocol)
    q = Question("q0", f"Where was {entity} born?", [entity])
    episodes, _ = runner.run([q], group_size=2, sampling=SamplingConfig(max_new_tokens=64))
    ep = episodes[0]
    assert ep.finish == "answer" and [t.kind for t in ep.turns] == ["search", "answer"] and ep.answer == entity
    first, last = ep.turns
    assert first.content == entity and first.docs
    # token-in token-out: the sequence is prompt + the sampled ids as generated + observation ids
    assert first.action_ids == encode(tok, search) and last.action_ids == encode(tok, answer)
    assert ep.token_ids == ep.prompt_ids + first.action_ids + first.obs_ids + last.action_ids
    obs = observation_text(runner.pieces, format_docs(first.docs, tok, protocol, 24), protocol)
    rendered = prompt_text(tok, q.text, protocol) + search + obs + answer
    assert _decode(tok, ep.token_ids) == rendered
    assert _decode(tok, first.obs_ids) == obs
    assert obs.startswith("<|im_end|>\n<|im_start|>user\n<information>(1) ")
    # the merge happens inside the sampled action (e.g. Qwen's '>F'), never across a turn boundary
    assert _decode(tok, first.action_ids).endswith(f"{entity}</search>")
    # loss mask: 1 exactly on the sampled tokens; turn ids: -1 on the prompt, then the turn index
    batch = RolloutBatch.from_episodes(episodes, tok.pad_token_id)
    n_p, n_a, n_o, n_b = len(ep.prompt_ids), len(first.action_ids), len(first.obs_ids), len(last.action_ids)
    expected_mask = [0] * n_p + [1] * n_a + [0] * n_o + [1] * n_b
    assert batch.loss_mask[0, : len(expected_mask)].tolist() == expected_mask
    assert batch.turn_ids[0, : len(expected_mask)].tolist() == [-1] * n_p + [0] * (n_a + n_o) + [1] * n_b
    assert batch.attention_mask[0].sum().item() == len(ep.token_ids)
    # probe boundaries sit right after an assistant header; the probe gold decodes to the answer
    bounds, parts = probe_inputs_from_episodes(episodes, tok, runner.pieces, protocol)
    assert bounds[0] == [n_p, n_p + n_a + n_o]
    for b in bounds[0]:
        assert _decode(tok, ep.token_ids[:b]).endswith("<|im_start|>assistant\n")
    assert entity in _decode(tok, list(parts[0][1]))
    prefix, gold, suffix = parts[0]
    assert list(prefix) + list(gold) + list(suffix) == encode(
        tok, protocol.probe_prefix() + entity + protocol.answer[1] + runner.pieces.assistant_end)


def test_qwen_tokenizer_matches_the_public_one(qwen_tokenizer, qwen_tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    from igpo.models.qwen import QWEN25_ADDED_TOKENS

    tok = qwen_tokenizer
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 151665
    assert tok("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert tok("Hello, world!", add_special_tokens=False).input_ids == [9707, 11, 1879, 0]
    assert tok.convert_ids_to_tokens(encode(tok, "<search>Fennusil</search>")) == \
        ["<", "search", ">F", "enn", "us", "il", "</", "search", ">"]
    assert [tok.convert_tokens_to_ids(t) for _, t, _ in QWEN25_ADDED_TOKENS] == list(range(151643, 151665))
    special = {t for _, t, s in QWEN25_ADDED_TOKENS if s}
    assert {t for t in tok.all_special_tokens if t.startswith("<|")} == special
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    raw = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))  # AutoTokenizer == tokenizer.json
    for text in ["café Zürich 12345  x\n\n", "<|im_start|>user\nhi<|im_end|><tool_call>", "東京 Łódź ‘q’"]:
        assert encode(tok, text) == raw.encode(text, add_special_tokens=False).ids
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
