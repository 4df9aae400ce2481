"""transformers generator: the fallback when vLLM is unavailable, and a no-sync option for small runs.

`HFGenerator("path")` loads its own copy of a model in `setup()`; `HFGenerator(live_model, tokenizer)`
samples from the trainer's model itself (a peft model too), so weight sync is a no-op. Prompts are
left-padded into batches; each result is cut right after its first stop (EOS, a stop token or a stop
string), so padding and tokens sampled after a stop never reach the rollout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import nn

from igpo.generator.base import Generation, SamplingConfig, check_prompts, split_stops

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFGenerator:
    """A `Generator` on transformers `generate`; log-probs come from the processed scores (after
    temperature/top-k/top-p), the same definition as `VLLMGenerator`. Temperature 0 is greedy."""

    def __init__(
        self,
        model: str | nn.Module,
        tokenizer: Any = None,
        *,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        device: str = "cpu",
        batch_size: int = 64,
        stop_ids_for_tokens: bool = True,
    ) -> None:
        if isinstance(model, nn.Module) and tokenizer is None:
            raise ValueError("HFGenerator: wrapping a live model needs its tokenizer")
        if dtype not in DTYPES:
            raise ValueError(f"HFGenerator: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.source = model
        self.model: Any = model if isinstance(model, nn.Module) else None
        self.tokenizer = tokenizer
        self.dtype = DTYPES[dtype]
        self.device = device
        self.batch_size = batch_size
        self.stop_ids_for_tokens = stop_ids_for_tokens

    def setup(self) -> None:
        """Load the model and tokenizer from the path (nothing to do when wrapping a live model)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.tokenizer is None or isinstance(self.tokenizer, str):
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer or str(self.source))
        if self.model is None:
            model = AutoModelForCausalLM.from_pretrained(str(self.source), dtype=self.dtype)
            self.model = model.to(self.device).eval()

    def close(self) -> None:
        """Drop the own copy of the model (a wrapped live model is left alone)."""
        if not isinstance(self.source, nn.Module):
            self.model = None

    def shares_weights(self, model: nn.Module) -> bool:
        """True when this generator samples from `model` itself, so no weight sync is needed."""
        return self.model is model

    # ---- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        """Sample one continuation per prompt, in left-padded batches of `batch_size`.

        With `sampling.seed`, the call runs under a forked RNG seeded with it: reproducible, and the
        caller's (trainer's) RNG stream is left untouched.
        """
        model = self._model()
        check_prompts(prompts, "HFGenerator.generate")
        if not prompts:
            return []
        stop_ids, stop_strings = split_stops(self.tokenizer, sampling.stop, self.stop_ids_for_tokens)
        eos = sorted({*_as_list(model.generation_config.eos_token_id), *stop_ids})
        config = self._generation_config(sampling, eos, stop_strings)
        seeded = torch.random.fork_rng(devices=[]) if sampling.seed is not None else contextlib.nullcontext()
        results: list[Generation] = []
        with seeded, _eval(model):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start:start + self.batch_size]
                ids, mask = _pad(batch, self._pad_id(), self.device, left=True)
                extra = {"tokenizer": self.tokenizer} if stop_strings else {}
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
                new = out.sequences[:, ids.shape[1]:]
                logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1)
                logprobs = logprobs.gather(-1, new.unsqueeze(-1)).squeeze(-1)
                for row_ids, row_lps in zip(new.tolist(), logprobs.tolist(), strict=True):
                    results.append(self._cut(row_ids, row_lps, set(eos), stop_strings))
        return results

    def _generation_config(self, s: SamplingConfig, eos: list[int], stop_strings: list[str]) -> Any:
        from transformers import GenerationConfig

        sample = s.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=s.max_new_tokens, do_sample=sample, eos_token_id=eos, pad_token_id=self._pad_id(),
            return_dict_in_generate=True, output_scores=True, stop_strings=stop_strings or None,
        )
        if sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=max(s.top_k, 0))
        return GenerationConfig(**kwargs)

    def _cut(self, ids: list[int], logprobs: list[float], stops: set[int], strings: list[str]) -> Generation:
        """Keep tokens up to and including the first stop token or the token completing a stop string."""
        end = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
        if strings:
            hit = _first_string_stop(self.tokenizer, ids[:end], strings)
            end = hit if hit is not None else end
        reason = "length" if end is None else "stop"
        ids, logprobs = ids[:end], logprobs[:end]
        return Generation(ids, logprobs, self.tokenizer.decode(ids, skip_special_tokens=False), reason)

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """Per-token log-probs of given sequences by a teacher-forced forward (position 0 = 0.0)."""
        model = self._model()
        check_prompts(sequences, "HFGenerator.score")
        if not sequences:
            return []
        result: list[list[float]] = []
        with _eval(model):
            for start in range(0, len(sequences), self.batch_size):
                batch = sequences[start:start + self.batch_size]
                ids, mask = _pad(batch, self._pad_id(), self.device, left=False)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                lp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                result += [[0.0] + lp[i, : len(s) - 1].tolist() for i, s in enumerate(batch)]
        return result

    def load_weights(self, named_tensors: NamedTensors) -> None:
        """Copy HF-named full tensors into the own model copy (the `merged` sync into a HF generator)."""
        model = self._model()
        if isinstance(self.source, nn.Module):
            raise RuntimeError("HFGenerator.load_weights: it wraps the live model; no sync is needed")
        state = dict(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        missing = set(state) - set(model.state_dict())
        if missing:
            raise KeyError(f"HFGenerator.load_weights: unknown parameter names {sorted(missing)[:5]}")
        with torch.no_grad():
            model.load_state_dict(state, strict=False)

    # ---- helpers ---------------------------------------------------------------------------------
    def _model(self) -> Any:
        if self.model is None or self.tokenizer is None or isinstance(self.tokenizer, str):
            raise RuntimeError("HFGenerator: call setup() first")
        return self.model

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else _as_list(self.model.generation_config.eos_token_id)[0]


def _first_string_stop(tokenizer: Any, ids: list[int], strings: list[str]) -> int | None:
    """Length of the shortest prefix of `ids` whose text contains a stop string (binary search)."""

    def hit(n: int) -> bool:
        text = tokenizer.decode(ids[:n], skip_special_tokens=False)
        return any(s in text for s in strings)

    if not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo


def _pad(batch: list[list[int]], pad: int, device: str, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of a batch padded to its longest sequence (left for generation)."""
    width = max(map(len, batch))

    def row(seq: list[int], fill: int, value: int | None) -> list[int]:
        body = list(seq) if value is None else [value] * len(seq)
        return [fill] * (width - len(seq)) + body if left else body + [fill] * (width - len(seq))

    ids = torch.tensor([row(s, pad, None) for s in batch], device=device)
    mask = torch.tensor([row(s, 0, 1) for s in batch], device=device)
    return ids, mask


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Sample/score in eval mode (no LoRA dropout), then restore the trainer's mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _as_list(x: int | list[int] | None) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)
