"""The Qwen2.5 tokenizer and a Qwen2.5-0.5B-shaped model, built offline.

The 151,643 byte-level BPE ranks of Qwen2/Qwen2.5 ship inside the PyPI wheel `dashscope`
(`dashscope/resources/qwen.tiktoken`). `build_qwen25_tokenizer` turns them into Qwen2.5's tokenizer: the
Qwen2 split pattern (digits one by one) after NFC, the 22 special/added tokens 151643–151664 with the
flags of the public Qwen2.5 `tokenizer_config.json`, and its ChatML template with the default system
prompt. It is saved with `tokenizer_class: Qwen2Tokenizer` like the public one, so `AutoTokenizer` builds
the same tokenizer class users get (and the ids are checked to agree with `tokenizer.json`).

`qwen25_05b_shaped` saves a randomly initialised model with Qwen2.5-0.5B's published sizes (vocabulary
151,936, hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, tied embeddings) and that tokenizer,
for memory and shape tests (`num_layers` can be lowered for quick ones). Both are cached by content.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from igpo.io import atomic_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, Qwen2Config

BUILD_VERSION = 1  # bump when what these builders write changes
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
N_RANKS = 151643
# (id, content, special) exactly as Qwen2.5's tokenizer_config.json lists its added tokens
QWEN25_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True), (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True), (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True), (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False), (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False), (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False), (151664, "<|file_sep|>", False),
)
QWEN25_ADDITIONAL_SPECIAL = [t for i, t, special in QWEN25_ADDED_TOKENS if special and i > 151643]
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + QWEN25_DEFAULT_SYSTEM + "' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def qwen_ranks_file() -> Path:
    """`qwen.tiktoken` inside the installed `dashscope` wheel (found without importing dashscope)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the package 'dashscope' is not installed; install the 'models' extra "
                                  "(scripts/install.sh) or: pip install --no-deps dashscope==2.0.2")
    for location in spec.submodule_search_locations:
        path = Path(location) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise FileNotFoundError("dashscope/resources/qwen.tiktoken not found in the installed dashscope")


def build_qwen25_backend(ranks_file: str | Path | None = None) -> Tokenizer:
    """The `tokenizers` object of Qwen2.5: BPE over the tiktoken ranks + NFC + Qwen2 split + byte level."""
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:  # no tiktoken download cache involved
            lines = Path(path).read_bytes().splitlines()
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}

    tok = _Converter(vocab_file=str(ranks_file or qwen_ranks_file()), pattern=QWEN2_SPLIT_PATTERN).converted()
    if tok.get_vocab_size() != N_RANKS:
        raise ValueError(f"qwen: expected {N_RANKS} BPE ranks, got {tok.get_vocab_size()}")
    tok.model.ignore_merges = False  # as Qwen2.5's tokenizer.json (and Qwen2Tokenizer) have it
    tok.normalizer = normalizers.NFC()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for token_id, content, special in QWEN25_ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tok.token_to_id(content) != token_id:
            raise ValueError(f"qwen: {content} got id {tok.token_to_id(content)}, expected {token_id}")
    return tok


def build_qwen25_tokenizer(ranks_file: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Qwen2.5(-Instruct)'s tokenizer in memory (eos `<|im_end|>`, pad `<|endoftext|>`, no BOS)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_qwen25_backend(ranks_file),
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        extra_special_tokens=QWEN25_ADDITIONAL_SPECIAL, chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=131072, clean_up_tokenization_spaces=False, split_special_tokens=False,
    )


def save_qwen25_tokenizer(out_dir: str | Path, ranks_file: str | Path | None = None) -> Path:
    """Save the tokenizer as a directory (written atomically) that `AutoTokenizer` loads as Qwen2Tokenizer."""
    out = Path(out_dir).resolve()
    with atomic_dir(out) as tmp:
        _write_tokenizer(build_qwen25_tokenizer(ranks_file), tmp)
    return out


def qwen25_tokenizer_dir(cache_root: str | Path | None = None) -> Path:
    """The Qwen2.5 tokenizer directory, built once into `<cache_root>/qwen2.5-tokenizer-<key>/`
    (key: sha256 of the ranks file and the builder version); `cache_root` defaults to `.artifacts/`."""
    ranks = qwen_ranks_file()
    out = _cache_root(cache_root) / f"qwen2.5-tokenizer-{_key(ranks)}"
    if (out / "tokenizer_config.json").is_file():
        return out
    return save_qwen25_tokenizer(out, ranks)


def qwen25_05b_config(num_layers: int = 24, max_position_embeddings: int = 32768) -> Qwen2Config:
    """Qwen2.5-0.5B's published configuration (fewer layers on request)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=num_layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        sliding_window=None, max_window_layers=num_layers, hidden_act="silu", bos_token_id=None,
        eos_token_id=151645, pad_token_id=151643, dtype="bfloat16",
    )


def qwen25_05b_shaped(
    cache_root: str | Path | None = None, *, num_layers: int = 24, seed: int = 0,
    dtype: Literal["bfloat16", "float32"] = "bfloat16",
) -> Path:
    """A randomly initialised (seeded) Qwen2.5-0.5B-shaped model with the Qwen2.5 tokenizer, saved once
    into `<cache_root>/qwen2.5-0.5b-shaped-<key>/` and reused. 494 M parameters at 24 layers."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    ranks = qwen_ranks_file()
    out = _cache_root(cache_root) / f"qwen2.5-0.5b-shaped-{_key(ranks, num_layers, seed, dtype)}"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    config = qwen25_05b_config(num_layers)
    config.dtype = dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=[151645, 151643], pad_token_id=151643)
    tokenizer = build_qwen25_tokenizer(ranks)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        _write_tokenizer(tokenizer, tmp)
    return out


def _write_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    tokenizer.save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(tokenizer_class="Qwen2Tokenizer", errors="replace", add_prefix_space=False)
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _cache_root(cache_root: str | Path | None) -> Path:
    return Path(cache_root) if cache_root is not None else Path(__file__).resolve().parents[2] / ".artifacts"


def _key(ranks: Path, *parts: object) -> str:
    digest = hashlib.sha256(ranks.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps([digest, BUILD_VERSION, *parts]).encode()).hexdigest()[:16]
