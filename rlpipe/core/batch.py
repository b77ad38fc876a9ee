"""The :class:`Batch`: the field-addressed pytree that flows between stages.

It lives apart from :mod:`rlpipe.core.stage` because registering it as a JAX
pytree imports jax; :mod:`rlpipe.core.stage` re-exports it on first use, so
the stage protocols, and the plugin specs that name them, load without jax.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax


class FieldConflictError(ValueError):
    """A stage tried to replace a field that already exists in a batch."""


@jax.tree_util.register_pytree_with_keys_class
class Batch(Mapping[str, Any]):
    """An immutable, field-addressed pytree: the unit that flows between stages.

    Fields are named arrays (``prompt_tokens``, ``completion_tokens``,
    ``completion_mask``, ``rollout_logprobs``, ``ref_logprobs``, ``values``,
    ``rewards``, ``policy_version``, ...).  Stages *add* fields; a field, once
    produced, is never replaced, so every consumer sees exactly what its
    producer wrote.  ``Batch`` is a JAX pytree (keys are field names), so it can
    be passed straight into ``jax.jit``-ed functions or ``jax.device_put``.

    Example:
        >>> b = Batch(prompt_tokens=[[1, 2]])
        >>> b2 = b.add(completion_tokens=[[3]])
        >>> sorted(b2)
        ['completion_tokens', 'prompt_tokens']
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, Any] | None = None, /, **kwargs: Any):
        merged = dict(fields or {})
        for name in kwargs:
            if name in merged:
                raise FieldConflictError(f"field {name!r} given twice")
        merged.update(kwargs)
        object.__setattr__(self, "_fields", merged)

    def __getitem__(self, name: str) -> Any:
        try:
            return self._fields[name]
        except KeyError:
            raise KeyError(f"batch has no field {name!r} (fields: {', '.join(sorted(self._fields)) or 'none'})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Batch is immutable; use Batch.add(...) to add fields")

    def __repr__(self) -> str:
        return f"Batch({', '.join(sorted(self._fields))})"

    def add(self, **fields: Any) -> Batch:
        """Returns a new batch with ``fields`` added.

        Raises:
            FieldConflictError: if a field already exists; fields are never
                replaced, only added.
        """
        clash = sorted(set(fields) & set(self._fields))
        if clash:
            raise FieldConflictError(f"field(s) {', '.join(map(repr, clash))} already present; stages add fields, never replace them")
        return Batch({**self._fields, **fields})

    def merge(self, other: Batch) -> Batch:
        """Union of two batches that descend from the same item.

        Fields present in both must be the very same object (they were produced
        once, upstream of both branches); anything else is a conflict.
        """
        out = dict(self._fields)
        for name, value in other._fields.items():
            if name in out and out[name] is not value:
                raise FieldConflictError(f"field {name!r} differs between two branches of the graph")
            out[name] = value
        return Batch(out)

    # -- pytree protocol -------------------------------------------------
    def tree_flatten_with_keys(self):
        names = sorted(self._fields)
        return [(jax.tree_util.DictKey(n), self._fields[n]) for n in names], tuple(names)

    @classmethod
    def tree_unflatten(cls, names, children):
        return cls(dict(zip(names, children)))
