"""Several trainer processes (Lightning DDP, `trainer.strategy=ddp`): the few collective helpers igpo needs.

Every rank rolls out its own share of a step's questions with its own engine (`RolloutDataModule` shards by
`rank_and_world`), Lightning all-reduces (averages) the gradients, and these helpers make the rest global:
the loss normalisation counts the aggregation units of all ranks (`all_sum`), logged step metrics and
validation episodes are combined over ranks (`mean_over_ranks`, `gather_lists`). With one process (or no
process group) every helper is the identity, so single-process runs do not pay for them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process: (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(value: float) -> float:
    """The sum of `value` over all ranks (float64 all-reduce; gloo on CPU, NCCL on GPUs)."""
    _, world = rank_and_world()
    if world == 1:
        return float(value)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on any rank (a decision every rank must take together, e.g. a skip)."""
    return all_sum(1.0 if flag else 0.0) > 0


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that have it (one all_gather_object, so ranks may log different keys
    without a collective per key). Ranks hold equal shares of the batch, so a mean of per-rank means is the
    mean over the union batch; per-rank sums (e.g. tokens generated) come out as the mean per rank."""
    _, world = rank_and_world()
    if world == 1:
        return dict(metrics)
    gathered: list[dict[str, float] | None] = [None] * world
    dist.all_gather_object(gathered, {k: float(v) for k, v in metrics.items()})
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for g in gathered for k in g):  # first-seen order
        values = [g[key] for g in gathered if key in g]
        out[key] = sum(values) / len(values)
    return out


def gather_lists(rows: dict[str, list]) -> dict[str, list]:
    """Per key, the concatenation of every rank's list (rank order): e.g. validation metrics of the episodes
    each rank ran, so means are over all episodes, not means of per-rank means."""
    _, world = rank_and_world()
    if world == 1:
        return {k: list(v) for k, v in rows.items()}
    gathered: list[dict[str, list] | None] = [None] * world
    dist.all_gather_object(gathered, {k: list(v) for k, v in rows.items()})
    out: dict[str, list] = {}
    for g in gathered:
        for key, values in g.items():
            out.setdefault(key, []).extend(values)
    return out


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s contiguous block of `n` items split in `world` equal blocks
    (`n` must be divisible by `world`: a step's questions, whose groups never split across ranks)."""
    if n % world:
        raise ValueError(f"{n} items cannot be split evenly over {world} ranks")
    k = n // world
    return rank * k, (rank + 1) * k
