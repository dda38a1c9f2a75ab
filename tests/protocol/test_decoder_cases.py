"""The decoder against the table in cases.json, fed whole, split at every byte, and one
byte at a time; and against the naive reference parser on the same inputs."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from ssehub import Decoder, ServerSentEvent

from .reference import reference_decode

TABLE = json.loads((Path(__file__).parent / "cases.json").read_text())
CASES: list[dict[str, Any]] = TABLE["cases"]


def case_bytes(case: dict[str, Any]) -> bytes:
    if "input_hex" in case:
        return bytes.fromhex(case["input_hex"])
    raw: bytes = case["input"].encode()
    return raw


def expected_events(case: dict[str, Any]) -> list[ServerSentEvent]:
    return [ServerSentEvent(e["data"], e["event"], e["id"]) for e in case["events"]]


def decode(chunks: Iterable[bytes]) -> tuple[list[ServerSentEvent], int | None, str]:
    decoder = Decoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.close()
    return events, decoder.retry, decoder.last_event_id


def check(case: dict[str, Any], chunks: list[bytes]) -> None:
    events, retry, last_event_id = decode(chunks)
    where = f"{case['name']}: chunks {chunks!r}"
    assert events == expected_events(case), where
    assert retry == case["retry"], where
    assert last_event_id == case["last_event_id"], where


def test_table_is_well_formed() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names)) >= 100
    for case in CASES:
        assert ("input" in case) != ("input_hex" in case), case["name"]
        assert {"events", "retry", "last_event_id"} <= case.keys(), case["name"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_whole(case: dict[str, Any]) -> None:
    check(case, [case_bytes(case)])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_split_at_every_byte(case: dict[str, Any]) -> None:
    # Every split point, hence every awkward one: inside CR LF, inside a UTF-8 sequence or
    # the BOM, inside `data: `, right before and after each line end.
    raw = case_bytes(case)
    for at in range(len(raw) + 1):
        check(case, [raw[:at], raw[at:]])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_split_twice(case: dict[str, Any]) -> None:
    raw = case_bytes(case)
    for a in range(1, len(raw)):
        for b in range(a, len(raw), 3):
            check(case, [raw[:a], raw[a:b], raw[b:]])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_one_byte_at_a_time(case: dict[str, Any]) -> None:
    raw = case_bytes(case)
    check(case, [raw[i : i + 1] for i in range(len(raw))])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference_agrees_with_table(case: dict[str, Any]) -> None:
    # The table and the naive reference parser were written separately; each checks the other.
    outcome = reference_decode(case_bytes(case))
    assert outcome.events == expected_events(case)
    assert outcome.retry == case["retry"]
    assert outcome.last_event_id == case["last_event_id"]


def test_table_concatenated_in_many_chunkings() -> None:
    # All cases back to back (each closed by a blank line so it cannot bleed into the next)
    # exercise the block-at-a-time path with all kinds of blocks between blank lines.
    raw = b"".join(case_bytes(case) + b"\n\n" for case in CASES if "input" in case)
    expected = reference_decode(raw)
    for size in (1, 2, 3, 7, 64, 4096, len(raw)):
        events, retry, last_event_id = decode(raw[i : i + size] for i in range(0, len(raw), size))
        assert events == expected.events, size
        assert (retry, last_event_id) == (expected.retry, expected.last_event_id), size
