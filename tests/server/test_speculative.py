"""Prompt-lookup drafts and the adaptive draft length, in-process (no model)."""

from __future__ import annotations

from ggufserve.engine.speculative import AdaptiveLength, PromptLookup, SpecConfig

CONFIG = SpecConfig(n_max=16, min_key=2, max_key=8)


def drafter(history: list[int], config: SpecConfig = CONFIG) -> PromptLookup:
    return PromptLookup(history, capacity=len(history), config=config)


def test_the_tokens_after_an_earlier_match_of_the_tail_are_proposed() -> None:
    lookup = drafter([5, 6, 7, 8, 9, 1, 2, 5, 6])
    assert lookup.lookup(3) == [7, 8, 9]
    assert lookup.lookup(10) == [7, 8, 9, 1, 2, 5, 6]  # up to the history's end


def test_the_longest_match_wins_over_a_more_recent_shorter_one() -> None:
    # Tail [3, 4, 5]: matched 3 long after position 2, 2 long (more recent) at 8.
    lookup = drafter([3, 4, 5, 70, 71, 0, 9, 4, 5, 80, 81, 3, 4, 5])
    assert lookup.lookup(2) == [70, 71]


def test_the_latest_of_equally_long_matches_wins() -> None:
    lookup = drafter([1, 2, 30, 1, 2, 40, 1, 2])
    assert lookup.lookup(1) == [40]


def test_no_draft_below_the_shortest_key() -> None:
    assert drafter([1, 7, 2, 9, 8, 2]).lookup(4) == []  # only the last token matches
    assert drafter([1, 7, 2, 9, 8, 2], SpecConfig(min_key=1)).lookup(2) == [9, 8]
    assert drafter([4, 5]).lookup(4) == []
    assert drafter([3, 3, 3]).lookup(0) == []


def test_a_draft_stops_before_an_image_row() -> None:
    lookup = drafter([1, 2, 3, -1, -1, 4, 1, 2])
    assert lookup.lookup(5) == [3]


def test_pushed_tokens_extend_the_history_past_its_capacity() -> None:
    lookup = PromptLookup([1, 2, 3], capacity=3, config=CONFIG)
    for token in (9, 1, 2):
        lookup.push(token)
    assert lookup.lookup(4) == [3, 9, 1, 2]


def test_propose_is_capped_by_room_and_the_adaptive_length() -> None:
    lookup = drafter([*range(20), 0, 1])
    assert lookup.propose(room=100) == [2, 3, 4, 5]  # AdaptiveLength.START
    assert lookup.propose(room=2) == [2, 3]
    lookup.record(4, 4)
    assert lookup.propose(room=100) == [2, 3, 4, 5, 6, 7, 8, 9]


def test_full_acceptance_grows_the_length_to_n_max() -> None:
    length = AdaptiveLength(n_max=10)
    seen = []
    for _ in range(4):
        seen.append(length.limit())
        length.record(seen[-1], seen[-1])
    assert seen == [4, 8, 10, 10]


def test_a_partial_acceptance_sets_the_length_past_what_was_kept() -> None:
    length = AdaptiveLength(n_max=16)
    length.record(4, 4)
    length.record(8, 2)
    assert length.limit() == 3


def test_repeated_misses_switch_drafts_off_then_retry_with_a_longer_wait() -> None:
    length = AdaptiveLength(n_max=16)
    for _ in range(AdaptiveLength.MISSES_OFF):
        length.record(length.limit(), 0)
    off = [length.limit() for _ in range(AdaptiveLength.COOLDOWN_MIN)]
    assert off == [0] * AdaptiveLength.COOLDOWN_MIN
    assert length.limit() == AdaptiveLength.START  # retried
    for _ in range(AdaptiveLength.MISSES_OFF):
        length.record(length.limit(), 0)
    waits = 0
    while length.limit() == 0:
        waits += 1
    assert waits == 2 * AdaptiveLength.COOLDOWN_MIN
    # A hit resets the cooldown to the shortest.
    length.record(4, 4)
    for _ in range(AdaptiveLength.MISSES_OFF):
        length.record(length.limit(), 0)
    waits = 0
    while length.limit() == 0:
        waits += 1
    assert waits == AdaptiveLength.COOLDOWN_MIN


def test_no_draft_proposed_while_switched_off() -> None:
    lookup = drafter([*range(20), 0, 1])
    for _ in range(AdaptiveLength.MISSES_OFF):
        lookup.record(len(lookup.propose(room=100)), 0)
    assert lookup.propose(room=100) == []
    assert lookup.lookup(2) == [2, 3]  # the lookup itself still finds it
