"""Adversarial model outputs: `parse_action` never raises, always returns a well-formed Action, agrees
with a rendered action, and stays linear on 50k-character inputs (nested, unclosed, repeated tags)."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igpo.prompts import Action, AgentProtocol, parse_action

P = AgentProtocol()
CUSTOM = AgentProtocol(think=("[T]", "[/T]"), search=("<tool_call>", "</tool_call>"), answer=("[A]", "[/A]"))
# pieces a model actually emits around the protocol: tags, broken tags, chat markers, whitespace, text
PIECES = [*P.tags, *CUSTOM.tags, "<", ">", "</", "<think", "search>", "<<search>>", "<|im_end|>",
          "<|im_start|>assistant\n", " ", "\n", "\t", "query", "Zürich", "é", "\x00", "ans wer", "1948"]
FUZZ = settings(max_examples=5_000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def assert_valid(action: Action, protocol: AgentProtocol) -> None:
    assert isinstance(action, Action)
    assert action.kind in ("search", "answer", "malformed")
    assert isinstance(action.content, str) and isinstance(action.think, str)
    if action.kind == "malformed":
        assert action.content == ""
    else:
        assert action.content and action.content == action.content.strip()
        assert not any(tag in action.content for tag in protocol.tags)
    assert not any(tag in action.think for tag in protocol.tags)


tag_soup = st.lists(st.sampled_from(PIECES) | st.text(max_size=6), max_size=40).map("".join)


@FUZZ
@given(text=st.text(max_size=300) | tag_soup)
def test_fuzz_never_raises_default_protocol(text: str) -> None:
    assert_valid(parse_action(text), P)


@FUZZ
@given(text=st.text(max_size=300) | tag_soup)
def test_fuzz_never_raises_custom_protocol(text: str) -> None:
    assert_valid(parse_action(text, CUSTOM), CUSTOM)


free_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda s: not any(t in s for t in P.tags))


@settings(max_examples=1_000, deadline=None, derandomize=True)
@given(think=free_text, content=free_text, kind=st.sampled_from(["search", "answer"]),
       pad=st.sampled_from(["", " ", "\n", " \n\t"]))
def test_fuzz_rendered_actions_round_trip(think: str, content: str, kind: str, pad: str) -> None:
    action = parse_action(pad + P.action(think, kind, content) + pad)
    if content.strip():
        assert action == Action(kind, content.strip(), think.strip())
    else:
        assert action.kind == "malformed"  # an empty query or answer is not an action


def pathological(n: int, seed: int = 0) -> dict[str, str]:
    """Inputs of about n characters that would make a backtracking parser go quadratic or worse."""
    rng = random.Random(seed)
    half = "a" * (n // 2)
    soup = "".join(rng.choice(PIECES) for _ in range(n // 6))
    return {
        "plain": "a" * n,
        "unclosed_think": P.think[0] + "a" * n,
        "good_then_trailing": f"{P.think[0]}{half}{P.think[1]}{P.search[0]}{half}{P.search[1]}x",
        "repeated_open": P.think[0] * (n // 7),
        "nested": P.think[0] + P.search[0] * (n // 8),
        "whitespace_run": f"{P.think[0]}x{P.think[1]}" + " \n" * (n // 2) + "y",
        "broken_tags": "<thin" * (n // 5),
        "angle_brackets": P.think[0] + "<" * n,
        "alternating": (P.think[0] + "a" + P.think[1]) * (n // 17),
        "soup": soup,
        "valid_huge": f"{P.think[0]}{half}{P.think[1]}{P.answer[0]}{half}{P.answer[1]}",
    }


def _best_of(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.mark.parametrize("name", sorted(pathological(100)))
def test_50k_inputs_parse_in_linear_time(name: str) -> None:
    """A 50k-character input costs at most 50x one Python-level pass over its characters (the parser
    does ~10 look-ahead tests per character, a linear regex), and never more than 2 s."""
    text = pathological(50_000)[name]
    assert_valid(parse_action(text), P)
    elapsed = _best_of(lambda: parse_action(text))
    baseline = _best_of(lambda: sum(1 for ch in text if ch == "<"))  # one interpreted scan of the text
    assert elapsed <= 50 * baseline + 0.005, f"{name}: {elapsed * 1e3:.1f} ms vs scan {baseline * 1e3:.2f} ms"
    assert elapsed < 2.0
    small = pathological(5_000)[name]
    assert _best_of(lambda: parse_action(small)) * 10 * 5 + 0.005 >= elapsed  # 10x the text, not 100x the time
