"""When and how often to reconnect: the policy the sync and async clients share."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

# Gateways and load balancers answer these while the server behind them restarts: worth
# another try, unlike 4xx (the request is wrong) or 500 (the server is broken).
TRANSIENT_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class Reconnect:
    """How a client reconnects after its connection fails or ends.

    - `delay`: seconds before reconnecting, until the stream sets its own with `retry:`
      (WHATWG HTML 9.2.3: the reconnection time; browsers use a few seconds).
    - `multiplier`, `max_delay`: each failed attempt in a row multiplies the delay, up to
      `max_delay` seconds (a server's `retry:` larger than that is still honoured).
    - `jitter`: each wait is lengthened by a random fraction up to this, so clients of a
      restarted server do not all come back in the same instant.
    - `max_attempts`: failed attempts in a row before giving up and raising the last error
      (`None`: never give up). An attempt that receives any bytes resets the count.
    - `retry_statuses`: HTTP statuses treated like a dropped connection; any other non-2xx
      answer raises at once.
    """

    delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.25
    max_attempts: int | None = 10
    retry_statuses: frozenset[int] = field(default=TRANSIENT_STATUSES)

    def __post_init__(self) -> None:
        if self.delay < 0 or self.max_delay < 0 or self.jitter < 0:
            raise ValueError("delay, max_delay and jitter must not be negative")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None for no limit)")

    def wait(
        self,
        failures: int,
        retry_ms: int | None = None,
        random: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before the next attempt.

        `failures` counts the failed attempts in a row before this one (0 after a
        connection that worked); `retry_ms` is the stream's last `retry:` value.
        """
        base = self.delay if retry_ms is None else retry_ms / 1000
        backoff = base * self.multiplier ** min(failures, 64)
        delay = max(base, min(backoff, self.max_delay))
        return delay * (1 + self.jitter * random())

    def gives_up(self, failures: int) -> bool:
        """Whether `failures` failed attempts in a row exhaust this policy."""
        return self.max_attempts is not None and failures >= self.max_attempts


# `reconnect=False`: the first failure or end is final.
NEVER = Reconnect(max_attempts=1, retry_statuses=frozenset())
