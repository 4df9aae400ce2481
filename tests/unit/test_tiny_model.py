"""The offline tiny model: tokenizer consistency, chat template, determinism, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from igpo.models.tiny import build_tiny, main, read_corpus
from igpo.prompts import AgentProtocol, ChatPieces

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
TEXTS = [
    "1948", "12345", "  two  spaces", " leading space", "trailing   ", "café Zürich naïve", "cafe\u0301 decomposed",
    "line one\nline two\n\n\nend\n", "\ttab\r\n", "<think>x</think><search>Andus Zuraston</search>",
    "<|im_start|>user\n<information>(1) doc</information><|im_end|>\n<|im_start|>assistant\n",
    "<answer>1948</answer><|im_end|><|endoftext|>", "Now there's enough information to answer",
]


def small_corpus() -> list[str]:
    return [f"Entity {i} was founded in {1900 + i} in Zürich." for i in range(50)] + ["<think>x</think>"]


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("text", TEXTS)
def test_autotokenizer_ids_equal_tokenizer_json_ids(tiny_model_dir: Path, tiny_tokenizer, text: str) -> None:
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tiny_tokenizer.decode(ids) == raw.decode(ids, skip_special_tokens=False)


def test_digits_are_split_one_by_one(tiny_tokenizer) -> None:
    assert tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer.encode("1948", add_special_tokens=False)) == [
        "1", "9", "4", "8"
    ]


def test_tags_and_chatml_markers_are_single_ids(tiny_tokenizer) -> None:
    for token in [*AgentProtocol().tags, "<|im_start|>", "<|im_end|>", "<|endoftext|>"]:
        ids = tiny_tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert tiny_tokenizer.convert_ids_to_tokens(ids) == [token]
    # tags stay single ids inside running text, and the ids are distinct
    ids = tiny_tokenizer.encode("a<search>b</search>c", add_special_tokens=False)
    assert tiny_tokenizer.convert_tokens_to_ids("<search>") in ids
    tag_ids = [tiny_tokenizer.convert_tokens_to_ids(t) for t in AgentProtocol().tags]
    assert len(set(tag_ids)) == len(tag_ids)
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"
    assert set(tiny_tokenizer.all_special_tokens) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(tiny_tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text.replace("cafe\u0301", "caf\u00e9")  # NFC normalisation


def test_skip_special_tokens_keeps_protocol_tags(tiny_tokenizer) -> None:
    ids = tiny_tokenizer.encode("<think>a</think><answer>b</answer><|im_end|>", add_special_tokens=False)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think><answer>b</answer>"
    ids = tiny_tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_chat_template_renders_chatml(tiny_tokenizer) -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    text = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    closed = tiny_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert closed == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"


def test_chat_pieces_from_tokenizer(tiny_tokenizer) -> None:
    pieces = ChatPieces.from_tokenizer(tiny_tokenizer)
    assert pieces.assistant_end == "<|im_end|>"
    assert pieces.user_open == "\n<|im_start|>user\n"
    assert pieces.user_close == "<|im_end|>\n<|im_start|>assistant\n"


def test_build_is_byte_deterministic_and_seed_changes_weights(tmp_path: Path) -> None:
    a = build_tiny(tmp_path / "a", small_corpus(), vocab_size=300, seed=1, **SMALL)
    b = build_tiny(tmp_path / "b", small_corpus(), vocab_size=300, seed=1, **SMALL)
    c = build_tiny(tmp_path / "c", small_corpus(), vocab_size=300, seed=2, **SMALL)
    fa, fb, fc = files(a), files(b), files(c)
    assert set(fa) >= {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json", "chat_template.jinja"}
    assert fa == fb
    assert fa["model.safetensors"] != fc["model.safetensors"]
    assert {k: v for k, v in fa.items() if k != "model.safetensors"} == {
        k: v for k, v in fc.items() if k != "model.safetensors"
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs left behind


def test_build_refuses_existing_dir_unless_overwrite(tmp_path: Path) -> None:
    out = build_tiny(tmp_path / "m", small_corpus(), vocab_size=300, seed=1, **SMALL)
    with pytest.raises(FileExistsError, match="already exists"):
        build_tiny(out, small_corpus(), vocab_size=300, seed=1, **SMALL)
    before = files(out)["model.safetensors"]
    build_tiny(out, small_corpus(), vocab_size=300, seed=3, overwrite=True, **SMALL)
    assert files(out)["model.safetensors"] != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_build_rejects_bad_corpus_and_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no non-empty text"):
        build_tiny(tmp_path / "x", ["", ""], vocab_size=300, **SMALL)
    with pytest.raises(TypeError, match="text #1"):
        build_tiny(tmp_path / "x", ["a", 3], vocab_size=300, **SMALL)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tiny(tmp_path / "x", ["a"], vocab_size=100, **SMALL)
    assert not (tmp_path / "x").exists()


def test_model_loads_and_runs_forward(tiny_model_dir: Path, tiny_tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tiny_tokenizer)
    assert model.dtype == torch.float32 and cfg.tie_word_embeddings
    assert model.generation_config.eos_token_id[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tiny_tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    assert 3_000_000 < n_params < 6_000_000
    ids = torch.tensor([tiny_tokenizer.encode("<think>Where was Andus born?</think>", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_read_corpus_and_cli(tmp_path: Path) -> None:
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(small_corpus()) + "\n\n", encoding="utf-8")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": str(i), "contents": t}) for i, t in enumerate(small_corpus())))
    assert read_corpus(txt) == small_corpus() == read_corpus(jsonl)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"contents": "a"}\n{"title": "b"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_corpus(bad)
    main(["--out", str(tmp_path / "cli"), "--corpus", str(jsonl), "--vocab-size", "300", "--seed", "1",
          "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1",
          "--intermediate-size", "64"])
    direct = build_tiny(tmp_path / "direct", small_corpus(), vocab_size=300, seed=1, **SMALL)
    assert files(tmp_path / "cli") == files(direct)
    assert AutoTokenizer.from_pretrained(tmp_path / "cli").encode("1948", add_special_tokens=False)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_loads_tiny_model(tiny_model_dir: Path, tiny_tokenizer) -> None:
    pytest.importorskip("vllm")
    from igpo.generator.base import SamplingConfig
    from igpo.generator.vllm import VLLMGenerator

    gen = VLLMGenerator(str(tiny_model_dir), dtype="float32", max_model_len=512, seed=0)
    gen.setup()
    try:
        prompt = tiny_tokenizer.encode("<|im_start|>user\nQuestion: 1948?<|im_end|>\n", add_special_tokens=False)
        out = gen.generate([prompt], SamplingConfig(temperature=0.0, max_new_tokens=4))
        assert len(out[0].token_ids) >= 1
        vllm_tok = gen.tokenizer
        for text in TEXTS:
            want = tiny_tokenizer.encode(text, add_special_tokens=False)
            assert vllm_tok.encode(text, add_special_tokens=False) == want
    finally:
        gen.close()


def test_split_tags_trains_the_bare_form_of_a_word_after_a_tag() -> None:
    """At encode time a tag (an added token) splits the text first, so `Fenrel` after `<answer>` is a bare word.
    Trained on whole texts, BPE sees it only glued to the tag's `>` and the bare form falls apart into pieces the
    policy must spell; trained on the text between tags (`split_tags=True`) it is one token, as in the question."""
    import re

    from igpo.data.oracle import tokenizer_corpus
    from igpo.data.world import WorldConfig, build_world
    from igpo.models.tiny import train_tokenizer

    world = build_world(WorldConfig(n_people=60, n_companies=12, n_cities=8, n_countries=3, n_first_names=30,
                                    n_last_names=30, seed=2))
    texts = tokenizer_corpus(world, 200)
    bare = re.findall(r"(?:<search>|<answer>|<think>)(\w+)", " ".join(texts))  # the first word after a tag
    assert len(bare) > 1000

    def one_token_share(tok) -> float:
        return sum(len(tok.tokenize(w)) == 1 for w in bare) / len(bare)

    whole = train_tokenizer(texts, vocab_size=1024)
    split = train_tokenizer(texts, vocab_size=1024, split_tags=True)
    assert one_token_share(whole) < 0.5 < 0.95 < one_token_share(split)  # measured: 0.30 vs 0.99
    # the same texts encode and decode exactly, and tags stay single ids
    text = texts[-1]
    assert split.decode(split.encode(text, add_special_tokens=False)) == text
    assert split.tokenize("<answer>" + bare[0])[0] == "<answer>"
