"""Logical axes of every decoder parameter, and how they map onto a role's mesh.

Each parameter has logical axis names (``("vocab", "embed")`` for the token
embedding, ``("embed", "mlp")`` for the gate projection, ...).  Rules map
logical names to mesh axes: by default ``embed -> fsdp`` and ``vocab``,
``heads``, ``mlp -> tp``.  A mesh axis that the role's mesh does not have, or
that has size 1, leaves that dimension replicated, so the same model runs on
any mesh.  A dimension that the mesh axis does not divide is an error naming
the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jax.sharding import Mesh, PartitionSpec

# jax is imported in the functions that lay parameters out, so that the memory
# formulas (which use the logical axes) load without it.

#: Logical axis -> mesh axis.
DEFAULT_RULES: Mapping[str, str] = {"embed": "fsdp", "vocab": "tp", "heads": "tp", "mlp": "tp"}

_BY_NAME: Mapping[tuple[str, str], tuple[str | None, ...]] = {
    ("q_proj", "kernel"): ("embed", "heads"), ("k_proj", "kernel"): ("embed", "heads"),
    ("v_proj", "kernel"): ("embed", "heads"), ("o_proj", "kernel"): ("heads", "embed"),
    ("q_proj", "bias"): ("heads",), ("k_proj", "bias"): ("heads",), ("v_proj", "bias"): ("heads",),
    ("gate_proj", "kernel"): ("embed", "mlp"), ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"), ("lm_head", "kernel"): ("embed", "vocab"),
    ("value_head", "kernel"): ("embed", None), ("value_head", "bias"): (None,),
}
# LoRA adapters (rlpipe.models.lora) are laid out like the kernel they factor:
# ``lora_a`` [in, rank] takes its input axis, ``lora_b`` [rank, out] its output
# axis (so under tensor parallelism B's output is split as the base product's
# is), and the rank is never split.
_BY_NAME = {
    **_BY_NAME,
    **{(t, "lora_a"): (axes[0], None) for (t, leaf), axes in _BY_NAME.items() if leaf == "kernel" and t.endswith("_proj")},
    **{(t, "lora_b"): (None, axes[1]) for (t, leaf), axes in _BY_NAME.items() if leaf == "kernel" and t.endswith("_proj")},
}


class ShardingError(ValueError):
    """A parameter cannot be laid out on a mesh."""


def logical_axes(path: Sequence[Any], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at ``path`` (names and indices)."""
    names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
    names = [n for n in names if n != "value"]
    if names and names[-1] == "embed_tokens":
        return ("vocab", "embed")
    if len(names) >= 2 and (names[-2], names[-1]) in _BY_NAME:
        return _BY_NAME[(names[-2], names[-1])]
    return (None,) * ndim  # norms and anything unknown: replicated


def partition_spec(path: Sequence[Any], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, str] = DEFAULT_RULES) -> PartitionSpec:
    import jax
    from jax.sharding import PartitionSpec

    axes = logical_axes(path, len(shape))
    spec = []
    for dim, logical in zip(shape, axes):
        mesh_axis = rules.get(logical) if logical else None
        if mesh_axis is None or mesh_axis not in mesh.shape or mesh.shape[mesh_axis] == 1:
            spec.append(None)
            continue
        if dim % mesh.shape[mesh_axis]:
            name = jax.tree_util.keystr(tuple(path))
            raise ShardingError(f"parameter {name} dimension {dim} ({logical}) is not divisible by mesh axis "
                                f"{mesh_axis!r} of size {mesh.shape[mesh_axis]}")
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def shardings_for(state: Any, mesh: Mesh, rules: Mapping[str, str] = DEFAULT_RULES, memory_kind: str | None = None) -> Any:
    """A pytree of ``NamedSharding`` matching ``state`` (an ``nnx.State`` or any
    pytree of arrays whose paths follow the decoder's names)."""
    import jax
    from jax.sharding import NamedSharding

    def one(path, leaf):
        sharding = NamedSharding(mesh, partition_spec(path, leaf.shape, mesh, rules))
        return sharding.with_memory_kind(memory_kind) if memory_kind else sharding

    return jax.tree_util.tree_map_with_path(one, state)
