"""Episode bookkeeping and RolloutBatch padding: turn ids, loss mask and probe boundaries are explicit."""

import pytest
import torch

from igpo.types import Episode, Question, RolloutBatch, Turn


def _episode(group=0):
    q = Question("q1", "Where?", ["Garmi"], "synth_1hop")
    ep = Episode(q, group, prompt_ids=[1, 2, 3])
    ep.turns.append(Turn(0, [10, 11], [-0.1, -0.2], "s", "search", "X", obs_ids=[20, 21, 22]))
    ep.turns.append(Turn(1, [12, 13, 14], [-0.3] * 3, "a", "answer", "Garmi"))
    ep.finish = "answer"
    return ep


def test_episode_views():
    ep = _episode()
    assert ep.token_ids == [1, 2, 3, 10, 11, 20, 21, 22, 12, 13, 14]
    assert ep.turn_ids == [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1]
    assert ep.loss_mask == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    assert ep.probe_boundaries == [3, 8]
    assert ep.answer == "Garmi" and ep.num_searches == 1 and ep.format_ok


def test_question_validates_answers():
    with pytest.raises(TypeError, match="q9"):
        Question("q9", "t", "Garmi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        Question("q9", "t", [])


def test_batch_padding_and_select():
    a, b = _episode(0), _episode(1)
    b.turns = b.turns[:1]
    b.finish = "max_turns"
    batch = RolloutBatch.from_episodes([a, b], pad_token_id=0)
    assert batch.input_ids.shape == (2, 11)
    assert batch.attention_mask[1].tolist() == [1] * 8 + [0] * 3
    assert batch.loss_mask[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert batch.turn_ids[1].tolist() == [-1, -1, -1, 0, 0, 0, 0, 0, -1, -1, -1]
    assert batch.group_ids.tolist() == [0, 1]
    sub = batch.select([1])
    assert sub.episodes == [b] and torch.equal(sub.input_ids, batch.input_ids[1:])
