"""A tiny Qwen2 model with a locally trained tokenizer: the offline default model of igpo.

No hub access is needed. `build_tiny` trains a byte-level BPE tokenizer on a corpus, wraps it with a
ChatML chat template and the protocol tags as single tokens, builds a randomly initialised (seeded)
`Qwen2ForCausalLM`, and saves a directory that transformers and vLLM load offline.

Pitfall handled here: with `model_type: qwen2`, transformers 5's `AutoTokenizer` returns `Qwen2Tokenizer`,
which rebuilds the backend from vocab + merges with Qwen2's own NFC normaliser and split regex (digits
one by one). We train with exactly that normaliser and pre-tokeniser, so `tokenizer.json` and
`AutoTokenizer` give the same ids.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from igpo.io import atomic_dir
from igpo.prompts import AgentProtocol

# Qwen2's pre-tokenizer split pattern (transformers/models/qwen2/tokenization_qwen2.py).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, protocol: AgentProtocol | None = None, split_tags: bool = False
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (Qwen2 pre-tokenisation) with ChatML markers and protocol tags.

    `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are special tokens (skipped by
    `decode(skip_special_tokens=True)`); the protocol tags (`<think>`, `</search>`, ...) are added
    tokens that are never split, so each is one id and stop tokens are single ids, but they are *not*
    special, so decoding a turn keeps them (as Qwen does for `<tool_call>`).
    """
    p = protocol or AgentProtocol()
    specials = [PAD_TOKEN, IM_START, IM_END]
    tags = list(dict.fromkeys(p.tags))
    if vocab_size < 256 + len(specials) + len(tags):
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is below the byte alphabet + special tokens")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(tags),
        special_tokens=[AddedToken(s, special=True, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if split_tags:
        texts = _segments(texts, [*specials, *tags])
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )


def _segments(texts: Iterable[str], markers: list[str]) -> Iterator[str]:
    """The pieces of each text between markers (special tokens and protocol tags): what the pre-tokeniser
    sees at encode time, where added tokens split the text first. Trained on whole texts instead, a word
    right after a tag (`<answer>Fenrel`) reaches BPE glued to the tag's `>` and never gets the merges of
    its bare form, so at encode time it falls apart into pieces (`Fen`+`rel`) that the policy must spell."""
    pattern = re.compile("|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    count = 0
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"train_tokenizer: text #{i} is {type(t).__name__}, expected str")
        if t:
            count += 1
            yield t
    if count == 0:
        raise ValueError("train_tokenizer: the corpus has no non-empty text")


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 1024,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Qwen2ForCausalLM:
    """A randomly initialised fp32 Qwen2 sized for CPU work; the vocab is padded to a multiple of 64.

    Initialisation uses a forked RNG seeded with `seed`, so it is reproducible and leaves the global
    torch RNG untouched.
    """
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"build_tiny_model: hidden_size={hidden_size} must divide by num_heads={num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    config = Qwen2Config(
        vocab_size=64 * math.ceil(len(tokenizer) / 64),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        use_sliding_window=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float().eval()


def build_tiny(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    split_tags: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    protocol: AgentProtocol | None = None,
    **model_kwargs: int | bool,
) -> Path:
    """Train the tokenizer, build the model and save both (plus a generation config) into `out_dir`.

    The directory is written atomically (built in a temporary sibling, then renamed) and is
    byte-identical for the same corpus, seed and sizes. Raises FileExistsError if `out_dir` exists
    unless `overwrite`.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"build_tiny: {out} already exists (pass overwrite=True to replace it)")
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, protocol=protocol, split_tags=split_tags)
    model = build_tiny_model(tokenizer, seed=seed, **model_kwargs)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD_TOKEN)],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )
    with atomic_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        _canonicalise_json(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


def _canonicalise_json(directory: Path) -> None:
    """Rewrite the config JSON files with sorted keys, so saved files do not depend on dict order
    (tokenizer.json is already canonical: the tokenizers library writes its vocab in id order)."""
    for path in sorted(directory.glob("*.json")):
        if path.name == "tokenizer.json":
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_corpus(path: str | Path) -> list[str]:
    """Texts of a corpus file: `.txt` = one text per non-empty line; `.jsonl` = one object per line
    with a `contents` (Search-R1 corpus format) or `text` field."""
    path = Path(path)
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        raise ValueError(f"read_corpus: {path} must end in .txt or .jsonl")
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("contents", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"read_corpus: {path}:{n} has no string 'contents' or 'text' field")
        texts.append(text)
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the offline tiny Qwen2 model and its tokenizer.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--corpus", required=True, help="corpus file (.txt lines or .jsonl with contents/text)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--intermediate-size", type=int, default=1024)
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = build_tiny(
        args.out, read_corpus(args.corpus), vocab_size=args.vocab_size, seed=args.seed, overwrite=args.overwrite,
        hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, intermediate_size=args.intermediate_size,
        max_position_embeddings=args.max_position_embeddings,
    )
    print(out)


if __name__ == "__main__":
    main()
