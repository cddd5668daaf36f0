"""What a workflow body sees: `ctx.run(...)` makes durable calls with deterministic ids."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import CallNotYieldedError, WorkflowUsageError
from .ids import check_patch_name, children_prefix, parent_id
from .patches import Patch
from .retry import RetryPolicy


class Call(NamedTuple):
    """A durable call a workflow yields; the runner sends back its result (a NamedTuple: one is
    built per step, on the hot path of replay)."""

    promise_id: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retry: RetryPolicy | None


class Begin(NamedTuple):
    """`ctx.begin(...)` yielded: start the call, send back a Handle at once."""

    call: Call


class Handle:
    """A durable call started with `ctx.begin`: `yield handle` waits for its result (or raises
    its StepError). It can be waited for more than once, and in a `ctx.gather`."""

    __slots__ = ("_future", "parent", "promise_id")

    def __init__(self, promise_id: str, future: Future[Any] | Any, parent: Context) -> None:
        self.promise_id = promise_id
        self._future = future
        self.parent = parent  # the workflow's Context that began it: only it may wait for it

    def done(self) -> bool:
        """Whether the call has ended (its promise is settled, or the run failed)."""
        return self._future.done()

    def __repr__(self) -> str:
        return f"Handle({self.promise_id}, {'done' if self.done() else 'running'})"


class Gather(NamedTuple):
    """`ctx.gather(*handles)` yielded: wait for all, send back their values in order."""

    handles: tuple[Handle, ...]


class MapCall(NamedTuple):
    """`ctx.map(fn, *iterables, concurrency=K)` yielded: one call per item, K at a time."""

    fn: Callable[..., Any]
    iterables: tuple[Iterable[Any], ...]
    concurrency: int
    retry: RetryPolicy | None


class Context:
    """Hands out the ids `<parent id>.<n>` in call order, so a replay finds the same ids again."""

    __slots__ = ("_children", "_next", "_unyielded", "parallelism", "promise_id")

    def __init__(self, promise_id: str, parallelism: int = 1) -> None:
        self.promise_id = promise_id
        # How many begun steps the runner runs at once (its workers): a workflow may size its
        # window of calls in flight by it, since ids never depend on when a call is waited for.
        self.parallelism = parallelism
        self._children = children_prefix(promise_id)
        self._next = 0
        self._unyielded: list[Call] = []  # calls made since the last yield

    def run(
        self, fn: Callable[..., Any], *args: Any, retry: RetryPolicy | None = None, **kwargs: Any
    ) -> Call:
        """A durable call of `fn(*args, **kwargs)`: yield it to get its result.

        `fn` is a plain function (a step, retried per `retry`) or a generator function taking a
        Context first (a sub-workflow, replayed like the root).
        """
        call = self.new_call(fn, args, kwargs, retry)
        self._unyielded.append(call)
        return call

    def begin(
        self, fn: Callable[..., Any], *args: Any, retry: RetryPolicy | None = None, **kwargs: Any
    ) -> Begin:
        """Start a durable call without waiting for it: `h = yield ctx.begin(...)` gives a Handle
        at once, `v = yield h` its result later. Calls begun together run concurrently (in the
        runner's pool of step processes, or one after the other in the driver without a pool,
        settled together); a sub-workflow begun is driven to its end right away."""
        call = self.new_call(fn, args, kwargs, retry)
        self._unyielded.append(call)
        return Begin(call)

    def gather(self, *handles: Handle) -> Gather:
        """Wait for every handle: `values = yield ctx.gather(h1, h2)`. If calls failed, the first
        failed one's StepError is raised there, once all have ended (the others' results are
        stored, and a replay returns them)."""
        for handle in handles:
            if type(handle) is not Handle:
                raise WorkflowUsageError(f"ctx.gather takes handles from ctx.begin, not {handle!r}")
        return Gather(handles)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        concurrency: int = 8,
        retry: RetryPolicy | None = None,
    ) -> MapCall:
        """`fn` over the items of the iterables (zipped, like the builtin map), at most
        `concurrency` calls in flight: `values = yield ctx.map(step, items, concurrency=4)`.

        The iterables are read lazily, one item per call started; the values come back in item
        order. Every item is run to its end even when one fails (so the calls a replay meets are
        always the same); then the first failure in item order is raised.
        """
        if type(concurrency) is not int or concurrency < 1:
            raise WorkflowUsageError(f"ctx.map: concurrency must be a whole number ≥ 1, not {concurrency!r}")
        if not iterables:
            raise WorkflowUsageError("ctx.map needs at least one iterable of items")
        try:
            iterators = tuple(iter(items) for items in iterables)
        except TypeError as exc:
            raise WorkflowUsageError(f"ctx.map takes iterables of items: {exc}") from None
        return MapCall(fn, iterators, concurrency, retry)

    def new_call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        retry: RetryPolicy | None,
    ) -> Call:
        """The next durable call of this workflow, with the next id (ctx.map's calls come from
        here one item at a time; they are never "not yielded")."""
        # ids.child_id(self.promise_id, self._next), inlined: a call per step costs replay ~3%
        call = Call(f"{self._children}{self._next}", fn, args, kwargs, retry)
        self._next += 1
        return call

    def patched(self, name: str) -> Patch:
        """Whether this run takes the new code of the change `name`: `if (yield ctx.patched(name)):`.

        True for new runs and for runs that reach it at the end of their history; False where a
        run recorded calls past this point with the old code (see patches.py).
        """
        return Patch(check_patch_name(name), False)

    def deprecate_patch(self, name: str) -> Patch:
        """Where `patched(name)` stood once no run needs the old branch: yield it (gives None)."""
        return Patch(check_patch_name(name), True)

    def take_yielded(self, call: Call) -> None:
        """The workflow yielded `call`: it must be the one call made since the last yield."""
        unyielded = self._unyielded
        if len(unyielded) == 1 and unyielded[0] is call:
            unyielded.clear()
            return
        if unyielded and unyielded[0] is not call:
            raise CallNotYieldedError(unyielded[0])
        raise WorkflowUsageError(
            f"workflow {self.promise_id} yielded the call {call.promise_id}, which is not its "
            "latest ctx.run(...): yield each call once, right where it is made"
        )

    def check_all_yielded(self) -> None:
        """The workflow ended: a call it made but never yielded would never have run."""
        if self._unyielded:
            raise CallNotYieldedError(self._unyielded[0])

    @property
    def calls_made(self) -> int:
        """How many durable calls the workflow has made so far."""
        return self._next


@dataclass(frozen=True, slots=True)
class StepInfo:
    """Who is running: the promise id and attempt number of the step, its registered name and
    version, the run's dependencies, and (on a PostgreSQL fleet) the step's transaction."""

    promise_id: str
    attempt: int
    fn: str
    dependencies: Mapping[str, Any]
    version: int = 1
    # A fleet executor's open database transaction (a psycopg connection), which also settles
    # the step's promise when it commits: what the step writes there is one with its resolve.
    transaction: Any = None

    @property
    def code(self) -> str:
        """Which code runs: `name vN`."""
        return f"{self.fn} v{self.version}"

    @property
    def parent_id(self) -> str:
        """The id of the workflow that made this call (ids are `<parent id>.<n>`)."""
        return parent_id(self.promise_id)

    def dependency(self, name: str) -> Any:
        try:
            return self.dependencies[name]
        except KeyError:
            raise LookupError(
                f"step {self.fn} ({self.promise_id}) needs the dependency {name!r}; "
                f"pass it to the Runner (has: {sorted(self.dependencies)})"
            ) from None


_current_step: ContextVar[StepInfo] = ContextVar("current_step")


def current_step() -> StepInfo:
    """The step being executed; only valid inside a step function."""
    try:
        return _current_step.get()
    except LookupError:
        raise RuntimeError("current_step() called outside a durable step") from None
