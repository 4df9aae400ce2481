"""Weight sync: after a sync the generator scores text exactly like the trainer's peft model (fp32).

For each strategy (merged full weights into an engine without LoRA; adapter files into an engine with
enable_lora=True) a LoRA policy whose B matrices are randomised differs from the base model; the
generator's log-probs of a text must differ from the trainer's before the sync and equal them to 1e-4
after it, twice in a row (a second update must replace, not add to, the first). MergedSync must leave
the training model's base weights bit-identical.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from igpo.generator import HFGenerator, SamplingConfig, VLLMGenerator
from igpo.generator.sync import (
    AdapterSync,
    MergedSync,
    NoSync,
    WeightSync,
    hf_name,
    make_sync,
    merged_state_dict,
)
from igpo.prompts import encode, prompt_ids
from tests.helpers import perturb_lora, sharpen

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOL = 1e-4
SYNC_SECONDS: dict[str, list[float]] = {}


def trainer_logprobs(model: torch.nn.Module, seqs: list[list[int]]) -> list[list[float]]:
    model.eval()
    out = []
    with torch.no_grad():
        for seq in seqs:
            logits = model(input_ids=torch.tensor([seq])).logits[0, :-1]
            lp = logits.log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
            out.append([0.0, *lp.tolist()])
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sharp_dir(tiny_model_dir: Path, tok, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharp")
    sharpen(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def lora_model(model_dir: Path) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))


@pytest.fixture(scope="module")
def texts(tok) -> list[list[int]]:
    return [prompt_ids(tok, q) + encode(tok, f"<think>so</think><answer>{a}</answer><|im_end|>")
            for q, a in (("Where was Ras Ton born?", "Mika"), ("When was Zu Corp founded?", "1948"))]


# ---- without an engine: the merge itself ----------------------------------------------------------------
def test_hf_name_maps_peft_names_to_plain_names() -> None:
    assert hf_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert hf_name("base_model.model.model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert hf_name("model.norm.weight") == "model.norm.weight"


def test_merged_state_dict_equals_peft_merge_without_touching_the_model(sharp_dir: Path) -> None:
    model = lora_model(sharp_dir)
    perturb_lora(model, seed=1)
    before = base_weights(model)
    merged = merged_state_dict(model)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()  # peft's own merge, on a copy
    assert set(merged) == set(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0, msg=name)
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(merged[f"{q}.weight"], before[f"base_model.model.{q}.base_layer.weight"])
    after = base_weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "base weights must stay bit-identical"
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged"))


def test_make_sync_builds_by_name(tmp_path: Path) -> None:
    assert isinstance(make_sync("merged"), MergedSync)
    assert isinstance(make_sync("none"), NoSync)
    adapter = make_sync("adapter", dir=tmp_path)
    assert isinstance(adapter, AdapterSync) and isinstance(adapter, WeightSync)
    with pytest.raises(ValueError, match="unknown strategy 'lora'"):
        make_sync("lora")  # type: ignore[arg-type]


def test_live_hf_generator_needs_no_sync(sharp_dir: Path, tok, texts) -> None:
    model = lora_model(sharp_dir)
    perturb_lora(model, seed=2)
    model.train()
    gen = HFGenerator(model, tok)
    gen.setup()
    assert MergedSync().sync(model, gen, 1) == 0.0 and make_sync("none").sync(model, gen, 1) == 0.0
    assert max_diff(gen.score(texts), trainer_logprobs(model, texts)) < TOL
    model.train()
    gen.generate([texts[0][:20]], SamplingConfig(temperature=0.0, max_new_tokens=4))
    assert model.training, "the generator restores the trainer's train mode"


def test_merged_sync_into_an_hf_copy(sharp_dir: Path, texts) -> None:
    """conf generator=hf keeps its own model copy: MergedSync pushes W + ΔW into it with load_weights."""
    model = lora_model(sharp_dir)
    perturb_lora(model, seed=3)
    gen = HFGenerator(str(sharp_dir))
    gen.setup()
    assert max_diff(gen.score(texts), trainer_logprobs(model, texts)) > 0.05
    assert MergedSync().sync(model, gen, 1) > 0
    assert max_diff(gen.score(texts), trainer_logprobs(model, texts)) < TOL
    with pytest.raises(KeyError, match="unknown parameter names"):
        gen.load_weights({"model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(1)})


# ---- real engines: merged into a plain engine, adapter into a LoRA engine -------------------------------
@pytest.fixture(scope="module", params=["merged", "adapter"])
def strategy(request: pytest.FixtureRequest, sharp_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(name, engine, sync); one engine at a time: pytest closes the first before starting the second."""
    pytest.importorskip("vllm")
    name = request.param
    gen = VLLMGenerator(str(sharp_dir), dtype="float32", max_model_len=512, max_num_seqs=8, seed=0,
                        enable_prefix_caching=True, enable_lora=name == "adapter", max_lora_rank=8,
                        kv_cache_space_gib=1)
    gen.setup()
    sync = make_sync(name, **({"dir": tmp_path_factory.mktemp("adapters")} if name == "adapter" else {}))
    yield name, gen, sync
    gen.close()


@pytest.mark.slow
@pytest.mark.vllm
def test_sync_makes_the_generator_score_like_the_trainer(strategy, sharp_dir: Path, tok, texts) -> None:
    name, gen, sync = strategy
    model = lora_model(sharp_dir)
    assert max_diff(gen.score(texts), trainer_logprobs(model, texts)) < TOL  # same base model
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8, stop=())
    prompts = [t[:24] for t in texts]
    base_tokens = [g.token_ids for g in gen.generate(prompts, greedy)]
    for version in (1, 2):
        perturb_lora(model, seed=10 + version)
        model.train()
        policy = trainer_logprobs(model, texts)
        assert max_diff(gen.score(texts), policy) > 0.05, "the policy must differ before the sync"
        before = base_weights(model)
        start = time.perf_counter()
        seconds = sync.sync(model, gen, version)
        assert 0 < seconds <= time.perf_counter() - start
        SYNC_SECONDS.setdefault(name, []).append(seconds)
        assert max_diff(gen.score(texts), policy) < TOL
        after = base_weights(model)
        assert all(torch.equal(before[n], after[n]) for n in before), "base weights must stay bit-identical"
        # generation follows the synced policy too: greedy tokens equal the trainer model's own
        live = HFGenerator(model, tok)
        live.setup()
        tokens = [g.token_ids for g in gen.generate(prompts, greedy)]
        assert tokens == [g.token_ids for g in live.generate(prompts, greedy)]
    assert tokens != base_tokens
    perturb_lora(model, seed=99)  # a resumed run re-syncs an already used version: it must still apply
    sync.sync(model, gen, 2)
    assert max_diff(gen.score(texts), trainer_logprobs(model, texts)) < TOL
    if name == "adapter":
        kept = sorted(p.name for p in sync.dir.iterdir())
        assert kept == ["v000001", "v000002"]
        assert sorted(p.name for p in (sync.dir / "v000002").iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert gen.lora.lora_int_id == 3 and gen.llm.llm_engine.list_loras() == {3}
    print(f"\n{name} sync seconds (tiny model): {SYNC_SECONDS[name]}")
