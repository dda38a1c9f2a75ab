"""The reconnection policy: pure arithmetic, so tested with a fixed `random`."""

from __future__ import annotations

import pytest

from ssehub.client import Reconnect

NO_JITTER = Reconnect(delay=1.0, multiplier=2.0, max_delay=30.0, jitter=0.0)


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(0, 1.0), (1, 2.0), (2, 4.0), (4, 16.0), (5, 30.0), (9, 30.0), (10_000, 30.0)],
)
def test_backoff_doubles_up_to_the_ceiling(failures: int, expected: float) -> None:
    assert NO_JITTER.wait(failures) == expected


def test_the_streams_retry_replaces_the_base_delay() -> None:
    assert NO_JITTER.wait(0, retry_ms=250) == 0.25
    assert NO_JITTER.wait(3, retry_ms=250) == 2.0


def test_a_retry_above_the_ceiling_is_still_honoured() -> None:
    # The server asked for 60 s: coming back sooner would defeat the point of asking.
    assert NO_JITTER.wait(0, retry_ms=60_000) == 60.0
    assert NO_JITTER.wait(5, retry_ms=60_000) == 60.0


def test_retry_zero_means_at_once() -> None:
    assert NO_JITTER.wait(3, retry_ms=0) == 0.0


def test_jitter_only_lengthens_the_wait() -> None:
    policy = Reconnect(delay=2.0, jitter=0.25)
    assert policy.wait(0, random=lambda: 0.0) == 2.0
    assert policy.wait(0, random=lambda: 0.5) == 2.25
    assert policy.wait(0, random=lambda: 0.999) == pytest.approx(2.4995)
    waits = {policy.wait(0) for _ in range(200)}
    assert all(2.0 <= w < 2.5 for w in waits)
    assert len(waits) > 100  # actually random


def test_max_attempts() -> None:
    policy = Reconnect(max_attempts=3)
    assert [policy.gives_up(n) for n in range(1, 5)] == [False, False, True, True]
    forever = Reconnect(max_attempts=None)
    assert not forever.gives_up(10**9)


@pytest.mark.parametrize(
    "kwargs",
    [{"delay": -1}, {"max_delay": -1}, {"jitter": -0.1}, {"multiplier": 0.5}, {"max_attempts": 0}],
)
def test_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        Reconnect(**kwargs)  # type: ignore[arg-type]


def test_transient_statuses_by_default() -> None:
    assert Reconnect().retry_statuses == {502, 503, 504}
