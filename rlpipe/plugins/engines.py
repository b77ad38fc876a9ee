"""rlpipe's built-in rollout engine, registered through the ``rlpipe`` entry point
``engines``: ``jax``, the pure-JAX KV-cache generator of :mod:`rlpipe.models.generation`."""

from __future__ import annotations

from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.specs import RolloutEngineSpec


def _jax_engine(graphdef, **options):
    from rlpipe.models.generation import Engine

    return Engine(graphdef, **options)


@hookimpl
def rlpipe_rollout_engines():
    yield RolloutEngineSpec(
        name="jax",
        description=("pure-JAX prefill + while-loop decode with an in-place KV cache, prompt-length buckets; "
                     "continuous batching with generate_refill"),
        factory=_jax_engine,
    )
