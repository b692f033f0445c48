"""StopScanner: UTF-8 split across tokens and OpenAI stop semantics."""

from __future__ import annotations

from ggufserve.engine.text import StopScanner


def run(scanner: StopScanner, pieces: list[bytes]) -> tuple[str, bool]:
    out, stopped = "", False
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out += text
        if stopped:
            return out, True
    return out + scanner.flush(), stopped


def test_multibyte_characters_split_across_tokens_are_held_until_whole() -> None:
    data = "é👩‍👩‍👧你".encode()
    scanner = StopScanner([])
    emitted = [scanner.feed(data[i : i + 1])[0] for i in range(len(data))]
    assert "".join(emitted) + scanner.flush() == "é👩‍👩‍👧你"
    assert all("\ufffd" not in piece for piece in emitted)
    assert emitted[0] == ""  # first byte of "é" alone is not sent


def test_invalid_bytes_become_replacement_character() -> None:
    assert run(StopScanner([]), [b"a\xffb"]) == ("a\ufffdb", False)


def test_stop_string_spanning_tokens_is_cut_and_excluded() -> None:
    assert run(StopScanner(["END"]), [b"hello E", b"N", b"D world"]) == ("hello ", True)


def test_possible_stop_prefix_is_held_then_released() -> None:
    scanner = StopScanner(["END"])
    assert scanner.feed(b"abc E") == ("abc ", False)
    assert scanner.feed(b"Nx") == ("ENx", False)
    assert scanner.flush() == ""


def test_earliest_of_several_stops_wins() -> None:
    assert run(StopScanner(["zz", "b"]), [b"a", b"bzz"]) == ("a", True)


def test_unfinished_prefix_is_flushed_at_end() -> None:
    assert run(StopScanner(["STOP"]), [b"text ST"]) == ("text ST", False)


def test_the_matched_stop_is_the_earliest_in_the_text() -> None:
    scanner = StopScanner(["END", "!!"])
    assert scanner.matched is None
    assert run(scanner, [b"Hi!", b"! and END"]) == ("Hi", True)
    assert scanner.matched == "!!"


def test_no_stop_matched_when_the_text_ends_without_one() -> None:
    scanner = StopScanner(["END"])
    run(scanner, [b"Hi EN", b"D?"[:0]])
    scanner.flush()
    assert scanner.matched is None
