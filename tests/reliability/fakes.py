"""Stand-ins for Serve deployment handles, to drive the ingress's chunk calls and readiness check without Ray."""

from __future__ import annotations

import asyncio

from deployments.config import AppArgs


class FakeResponse:
    """Stands in for a DeploymentResponse: awaitable once, cancellable."""

    def __init__(self, outcome):
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        if self.outcome == "hang":
            await asyncio.Event().wait()
        if callable(self.outcome) and not isinstance(self.outcome, BaseException):
            return await self.outcome()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    """``handle.method``: ``.remote()`` answers with the next scripted outcome (the last one repeats): a value,
    an exception to raise, "hang", or an async function to await."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    def remote(self, *args):
        self.calls += 1
        return FakeResponse(self.outcomes[min(self.calls, len(self.outcomes)) - 1])


class FakeDeployment:
    def __init__(self, **methods: FakeMethod):
        self.__dict__.update(methods)


def ingress_without_replica(handles: dict | None = None):
    """An Ingress object without a replica around it (its __init__ wants Ray metrics, not needed here)."""
    from deployments.ingress import Ingress

    class Bare(Ingress.func_or_class):
        def __del__(self) -> None:  # Serve's wrapper has an async __del__ for a replica's shutdown: nothing here
            pass

    obj = object.__new__(Bare)
    obj.args = AppArgs.model_validate({"models": [{"id": "m", "source": "/nonexistent"}]})
    obj.handles = {"m": handles or {}}
    obj._ready_until = 0.0
    obj._info = {}
    return obj
