"""Stages and the data that flows between them.

A *stage* is one role's work in the execution graph (rollout, reference,
trainer, critic, or anything a plugin adds).  Stages exchange :class:`Batch`
items: one micro-batch (or one prompt group) at a time, followed, once per
global batch, by a barrier.  The executor in :mod:`rlpipe.core.executor` owns the
threads, the queues and the barriers; a stage only transforms batches.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ContextManager, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    import jax

    from rlpipe.core.batch import Batch


@runtime_checkable
class Tracer(Protocol):
    """Where the executor and stages record spans of work on named tracks (one
    per role).  :class:`rlpipe.runtime.trace.Trace` writes them as a Chrome
    trace; :data:`UNTRACED` drops them.  Times are microseconds from any fixed
    origin."""

    def now_us(self) -> float: ...

    def complete(self, track: str, name: str, start_us: float, end_us: float, **args: Any) -> None: ...

    def instant(self, track: str, name: str, **args: Any) -> None: ...

    def span(self, track: str, name: str, **args: Any) -> ContextManager[None]: ...


class _Untraced:
    """A :class:`Tracer` that records nothing."""

    def now_us(self) -> float:
        return 0.0

    def complete(self, track: str, name: str, start_us: float, end_us: float, **args: Any) -> None:
        pass

    def instant(self, track: str, name: str, **args: Any) -> None:
        pass

    def span(self, track: str, name: str, **args: Any) -> ContextManager[None]:
        return contextlib.nullcontext()


#: The tracer of a run that keeps no timeline.
UNTRACED: Tracer = _Untraced()


@attrs.frozen(kw_only=True)
class StageContext:
    """What a stage may know about *when* it runs; passed keyword-only.

    It is one object so that it can grow new attributes without breaking
    plugins that do not use them.

    Attributes:
        role: the role this stage plays.
        step: the global step (global-batch index) being processed.
        index: micro-batch index within the global batch; ``None`` at the barrier.
        policy_version: number of policy updates published so far when the
            stage was invoked.
        behavior_version: the policy version this step's rollouts must be
            generated with: ``max(0, step - lag)`` for the plan's fixed lag
            (DESIGN §4), so an asynchronous run is as reproducible as an
            on-policy one whatever the thread timing.
        seed: the run's seed; use :meth:`key` for randomness.
        trace: the run's timeline, for stages that want finer spans.
    """

    role: str
    step: int
    index: int | None = None
    policy_version: int = 0
    behavior_version: int = 0
    seed: int = 0
    trace: Tracer | None = attrs.field(default=None, repr=False, eq=False)

    def span(self, name: str, **args: Any):
        """A span named ``name`` on this stage's track of the run's timeline
        (``generate``, ``logprobs``, ``train``, ...), carrying the step and
        micro-batch; a no-op when the run keeps no timeline."""
        if self.trace is None:
            return contextlib.nullcontext()
        return self.trace.span(self.role, name, step=self.step, index=self.index, **args)

    def key(self) -> jax.Array:
        """A PRNG key that depends only on (seed, role, step, index): runs are reproducible
        whatever the thread interleaving.  The role enters as a stable hash of its
        whole name (CRC-32 of the UTF-8 bytes, folded into 31 bits; not Python's
        per-process ``hash``), so ``reward_a`` and ``reward_b`` draw different numbers."""
        import jax

        role_id = zlib.crc32(self.role.encode("utf-8")) & 0x7FFFFFFF
        k = jax.random.fold_in(jax.random.key(self.seed), role_id)
        k = jax.random.fold_in(k, self.step)
        # The barrier (no index) folds in 2**32 - 1: ``fold_in`` takes uint32 data, so -1 overflows.
        return jax.random.fold_in(k, 0xFFFFFFFF if self.index is None else self.index)


@runtime_checkable
class Stage(Protocol):
    """One role's computation, set up on its placement by the role's factory.

    An implementation must guarantee:

    * ``process`` returns ``batch.add(...)`` of exactly the fields its role
      declares in ``produces``: every input field is passed on unchanged (the
      executor checks this and stops the run otherwise);
    * one output item per input item, in the order received;
    * it is called from one thread at a time (the stage's own), so a stage
      needs no locking for its own state.

    Example:
        >>> class Doubler:
        ...     def process(self, batch, *, context):
        ...         return batch.add(doubled=batch["x"] * 2)
    """

    def process(self, batch: Batch, *, context: StageContext) -> Batch: ...


@runtime_checkable
class BarrierStage(Protocol):
    """A stage with work at the global-batch barrier (e.g. the trainer's optimizer
    step and weight publish).  Called once per global batch, after the last item."""

    def on_barrier(self, *, context: StageContext) -> None: ...


@runtime_checkable
class OffloadableStage(Protocol):
    """A stage whose device state can move to host memory between uses.

    When its placement says ``offload``, the stage must start in host memory
    (its factory builds it there); the executor calls ``onload()`` before the
    stage's first item of a global batch and ``offload()`` after its barrier.
    Implementations must leave no device buffer of their state alive after
    ``offload()`` returns.
    """

    def offload(self) -> None: ...

    def onload(self) -> None: ...


@runtime_checkable
class StatefulStage(Protocol):
    """A stage with state to checkpoint.

    ``state()`` is called right after the stage's barrier of a checkpointed
    step; it returns a pytree of arrays and scalars that stays valid after
    the stage's later updates (copy to host memory what the updates donate).
    ``restore(state)`` accepts the same structure, its arrays possibly on the
    host, and must reproduce the stage exactly.
    """

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


@runtime_checkable
class WeightReceiver(Protocol):
    """A stage that holds a copy of the trained policy and takes every new version.

    The run driver connects every stage with this capability to the role that
    publishes weights (a :class:`WeightPublisher`, normally the graph's sink),
    whatever either role is called: ``load_weights(state, version)`` is called
    from the publisher's thread after each of its updates (and once after a
    restore) with the publisher's parameters and the new policy version.  The
    receiver copies or re-lays ``state`` onto its own devices; it must not keep
    a reference the publisher's next update may donate.

    Example:
        >>> class Holder:
        ...     def load_weights(self, state, version):
        ...         self.version = version
        >>> isinstance(Holder(), WeightReceiver)
        True
    """

    def load_weights(self, state: Any, version: int) -> None: ...


@runtime_checkable
class WeightPublisher(Protocol):
    """A stage that trains the policy and publishes its new weights.

    ``subscribe(callback)`` registers ``callback(state, version)``, called with
    every published version; ``publish()`` sends the current one again (after
    a restore).  The driver subscribes every :class:`WeightReceiver` to it.
    """

    def subscribe(self, callback: Callable[[Any, int], None]) -> None: ...

    def publish(self) -> None: ...


def weight_publisher(stages: Mapping[str, Any], sink: str | None = None) -> Any:
    """The stage that publishes the policy's weights: the ``sink`` role's stage
    when it is a :class:`WeightPublisher`, else the only publisher among
    ``stages``, else ``None``.

    Raises:
        ValueError: several stages publish weights and none is the sink.
    """
    if sink is not None and isinstance(stages.get(sink), WeightPublisher):
        return stages[sink]
    found = [role for role, stage in stages.items() if isinstance(stage, WeightPublisher)]
    if len(found) > 1:
        raise ValueError(f"several roles publish weights ({', '.join(found)}) and none is the graph's sink: "
                         "which one trains the policy is ambiguous")
    return stages[found[0]] if found else None


def __getattr__(name: str) -> Any:
    # Batch (and its error) are defined in rlpipe.core.batch, which imports jax
    # to register the pytree: load it only when a caller asks for them.
    if name in ("Batch", "FieldConflictError"):
        from rlpipe.core import batch

        return getattr(batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
