"""One decode daemon as the router sees it: its health, its load, this router's requests on it,
and the back-off after a failure.

Plain Python, no I/O: the watcher writes what it read from the daemon (`observed`, `down`), the
forwarder what happened to a request (`failed`), and the pool reads the rest.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """What a decode daemon's GET /status says of its load, when it was read."""

    in_flight: int = 0  # requests it holds, from every router and client
    waiting: int = 0  # of them, queued for KV pages or still arriving from prefill
    free_pages: int = 0  # KV pages free on its fullest rank
    own_at_read: int = 0  # this router's requests on it when the status was read

    @classmethod
    def of_status(cls, status: dict, own: int) -> Load:
        """The load in a /status body; ValueError naming what is missing or wrong."""
        try:
            requests = status["requests"]
            ranks = status["ranks"]
            free = [r["kv_pages"]["total"] - r["kv_pages"]["used"] for r in ranks]
            waiting = int(requests.get("waiting", 0)) + int(requests.get("arriving", 0))
            return cls(int(requests["in_flight"]), waiting, min(free, default=0), own)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"/status without {exc!s}") from None


class Target:
    """One decode daemon at `url`, standing in the pool for the configured targets that
    resolved to it (`origins`); with none left it is retiring."""

    def __init__(self, url: str, origins: set[str]) -> None:
        self.url = url
        self.origins = origins
        self.health = "unknown"  # "up", or why it cannot take requests
        self.load = Load()
        self.in_flight = 0  # this router's requests on it now
        self.backoff_until = 0.0  # time.monotonic() before which it gets no request
        self.last_failure: str | None = None
        self.picked = 0  # the pool's pick count when it was last picked

    @property
    def retiring(self) -> bool:
        """No configured target stands for it any more: it only finishes what it has."""
        return not self.origins

    @property
    def estimated_in_flight(self) -> int:
        # The daemon's count when read, moved by what this router started or ended since:
        # fresh between reads, and still counting what other routers send it.
        return max(self.in_flight, self.load.in_flight + self.in_flight - self.load.own_at_read)

    def rank(self) -> tuple[int, int, int]:
        """Sort key, least loaded first: requests in flight, then the most free KV pages,
        then the one picked longest ago."""
        return (self.estimated_in_flight, -self.load.free_pages, self.picked)

    def usable(self, now: float) -> bool:
        return self.health == "up" and not self.retiring and now >= self.backoff_until

    def state(self, now: float) -> str:
        """up, backoff, retiring, or why it is down (starting, stopping, unreachable…)."""
        if self.retiring:
            return "retiring"
        return "backoff" if now < self.backoff_until else self.health

    def observed(self, load: Load) -> bool:
        """Its /health said 200 and its /status `load`; True if its health changed."""
        self.load = load
        return self._set_health("up")

    def down(self, why: str) -> bool:
        """Its /health failed or said 503 (`why`); True if its health changed."""
        return self._set_health(why)

    def _set_health(self, health: str) -> bool:
        changed, self.health = health != self.health, health
        return changed

    def failed(self, now: float, backoff_s: float, why: str) -> None:
        """A request failed on it: no request for `backoff_s`, and after that only once its
        /health answers 200 again."""
        self.backoff_until = max(self.backoff_until, now + backoff_s)
        self.last_failure = why
        self.health = "unchecked since a failure"

    def describe(self, now: float) -> dict:
        """What the router's /health and /status show of it."""
        return {
            "url": self.url,
            "state": self.state(now),
            "in_flight": self.in_flight,
            "load": {
                "in_flight": self.load.in_flight,
                "waiting": self.load.waiting,
                "free_pages": self.load.free_pages,
            },
            "backoff_s": round(max(self.backoff_until - now, 0.0), 3),
            "last_failure": self.last_failure,
            "origins": sorted(self.origins),
        }
