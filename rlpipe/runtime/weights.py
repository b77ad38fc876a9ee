"""Moving parameter pytrees: weight sync between roles, and host offload.

Weight sync is a function of (source placement, target placement):

* same shardings and dtype: the target *shares* the source's buffers (no copy);
* same devices, other layout or dtype: one jitted program re-lays and casts;
* disjoint devices: ``jax.device_put`` to the target shardings (a device to
  device transfer), then the cast, if any, on the target;
* disjoint devices of several processes (a multi-process run): a transfer
  every process takes part in (:func:`rlpipe.runtime.distributed.transfer`).

Host offload moves arrays to the ``pinned_host`` memory kind with
``jax.device_put``, device to host directly, never through numpy (which is
several times slower on GPUs).  Onload moves them back to ``device``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlpipe.runtime import host_memory

HOST_MEMORY = "pinned_host"
DEVICE_MEMORY = "device"


def devices_of(tree: Any) -> frozenset:
    """Every device that holds a shard of some array of ``tree``."""
    out = set()
    for x in jax.tree_util.tree_leaves(tree):
        out |= set(x.sharding.device_set) if hasattr(x, "sharding") else set(x.device_set)
    return frozenset(out)


def sync(source: Any, target_shardings: Any, dtype: Any = None) -> Any:
    """``source`` laid out as ``target_shardings`` (a matching pytree of
    ``Sharding``) and cast to ``dtype`` (``None`` keeps each leaf's dtype).

    The result never aliases a buffer that a later update of ``source`` could
    change under it: JAX arrays are immutable, so sharing is safe.
    """
    dtype = None if dtype is None else jnp.dtype(dtype)
    leaves = jax.tree_util.tree_leaves(source)
    shards = jax.tree_util.tree_leaves(target_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    same_layout = all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, shards))
    same_dtype = dtype is None or all(x.dtype == dtype for x in leaves)
    if same_layout and same_dtype:
        return source
    target_devices = frozenset(d for s in shards for d in s.device_set)
    if devices_of(source) != target_devices:
        from rlpipe.runtime import distributed

        if distributed.current() is not None:
            # A multi-process run: no device_put between processes; every process takes part.
            return distributed.transfer(source, target_shardings, dtype)
    if devices_of(source) == target_devices:
        return _cast_program(dtype, target_shardings)(source)
    moved = jax.device_put(source, target_shardings)
    return moved if same_dtype else _cast_program(dtype, target_shardings)(moved)


_CAST_PROGRAMS: dict[Any, Any] = {}


def _cast_program(dtype: Any, target_shardings: Any) -> Any:
    """The jitted re-layout-and-cast to ``target_shardings``, built once per
    (dtype, tree structure, shardings): a weight sync every step must not
    trace and compile again (it did, and it dominated colocated steps)."""
    leaves, treedef = jax.tree_util.tree_flatten(target_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    key = (None if dtype is None else jnp.dtype(dtype).name, treedef, tuple(leaves))
    program = _CAST_PROGRAMS.get(key)
    if program is None:
        cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))
        program = jax.jit(lambda t: jax.tree_util.tree_map(cast, t), out_shardings=target_shardings)
        _CAST_PROGRAMS[key] = program
    return program


def with_memory_kind(tree: Any, kind: str) -> Any:
    """The same arrays moved to memory ``kind`` (``pinned_host`` or ``device``).

    On the CPU backend, where both kinds are ``malloc``'d host memory, the
    copies that earlier moves freed are first given back to the system
    (:func:`rlpipe.runtime.host_memory.release_freed`): a role moved every
    step would otherwise keep each freed generation of its arrays resident.
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if leaves and next(iter(leaves[0].sharding.device_set)).platform == "cpu":
        host_memory.release_freed()
    shardings = jax.tree_util.tree_map(lambda x: x.sharding.with_memory_kind(kind), tree)
    return jax.device_put(tree, shardings)


def offload(tree: Any) -> Any:
    """Moves every array of ``tree`` to host memory; the device buffers are freed
    once the caller drops its references to the old tree."""
    return with_memory_kind(tree, HOST_MEMORY)


def onload(tree: Any) -> Any:
    return with_memory_kind(tree, DEVICE_MEMORY)


def place_like(tree: Any, like: Any) -> Any:
    """``tree``'s arrays (host or device, any layout) put where the matching
    arrays of ``like`` live: the same shardings and memory kinds."""
    return jax.device_put(tree, jax.tree_util.tree_map(lambda x: x.sharding, like))


def device_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s arrays that sit in device memory."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        if x.sharding.memory_kind in (None, DEVICE_MEMORY):
            total += x.nbytes
    return total
