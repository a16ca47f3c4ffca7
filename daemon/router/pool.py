"""The decode daemons a router sends to: who is in (what each configured target resolves to),
who gets the next request (the least loaded), and who leaves (a retired daemon once its last
request has ended).

Plain Python, no I/O; everything runs on the router's event loop, so nothing here locks.
"""

from __future__ import annotations

from kvferry.daemon.router.targets import Target


class TargetPool:
    """Targets by URL. A URL may come from several configured targets (a name and a literal
    address); it retires when none of them stands for it any more."""

    def __init__(self) -> None:
        self._targets: dict[str, Target] = {}
        self._picks = 0

    def targets(self) -> list[Target]:
        return list(self._targets.values())

    def get(self, url: str) -> Target | None:
        return self._targets.get(url)

    def update(self, origin: str, urls: list[str]) -> tuple[list[str], list[str]]:
        """`origin` (a configured target) now stands for `urls`: (added, retiring) URLs.
        A retiring target stays until its requests in flight have ended."""
        added, retiring = [], []
        for url in urls:
            target = self._targets.get(url)
            if target is None:
                self._targets[url] = Target(url, {origin})
                added.append(url)
            elif origin not in target.origins:
                added += [url] if target.retiring else []
                target.origins.add(origin)
        for target in self.targets():
            if origin in target.origins and target.url not in urls:
                target.origins.discard(origin)
                if target.retiring:
                    retiring.append(target.url)
                    self._drop_if_done(target)
        return added, retiring

    def pick(self, now: float, exclude: set[str]) -> Target | None:
        """The least-loaded usable target not in `exclude`, counted in flight from now until
        `release`; None if there is none."""
        usable = [t for t in self._targets.values() if t.usable(now) and t.url not in exclude]
        if not usable:
            return None
        best = min(usable, key=Target.rank)
        self._picks += 1
        best.picked = self._picks
        best.in_flight += 1
        return best

    def release(self, target: Target) -> None:
        """A request picked on `target` has ended, however."""
        assert target.in_flight > 0, target.url
        target.in_flight -= 1
        self._drop_if_done(target)

    def usable(self, now: float) -> list[Target]:
        return [t for t in self._targets.values() if t.usable(now)]

    def why_none(self, now: float, exclude: set[str]) -> str:
        """Why no target outside `exclude` takes a request now, each named, for an error."""
        if not self._targets:
            return "none is known (no target resolved to an address)"
        others = [t for t in self._targets.values() if t.url not in exclude]
        if not others:
            return "every target was tried"
        return "; ".join(f"{t.url} ({t.state(now)})" for t in others)

    def _drop_if_done(self, target: Target) -> None:
        if target.retiring and target.in_flight == 0:
            self._targets.pop(target.url, None)
