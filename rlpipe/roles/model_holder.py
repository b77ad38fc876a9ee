"""A decoder's parameters held on a role's mesh, by policy version, with offload.

The rollout and reference stages hold their model this way: split into
graphdef and parameters, laid out with :func:`rlpipe.models.sharding.shardings_for`,
moved to host memory and back when the plan offloads the role.  Their inputs
(and KV caches) are split by rows over the mesh's ``fsdp`` axis (``rows``):
data-parallel inference, each device computing its share of the rows.

A model with LoRA adapters (``model.lora``) is held as its frozen base, once,
plus the adapters of each policy version: weight sync installs adapters only
(:meth:`ModelHolder.put`), and :attr:`ModelHolder.state` is the base and the
newest adapters composed into one state (the same arrays, no copy), which
the ``LoRALinear`` forward applies unmerged (docs/lora.md says why).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlpipe.core.placement import RolePlacement
from rlpipe.models.decoder import Decoder
from rlpipe.models.generation import row_sharding
from rlpipe.models.loading import add_adapters, load_model, load_policy
from rlpipe.models.lora import LoRAParam
from rlpipe.models.sharding import shardings_for
from rlpipe.runtime import weights


class SharedBase:
    """Frozen base weights held once on a mesh, for every role there that uses
    them (with ``model.lora``: the trainer's frozen base, the rollout's base,
    the reference model).

    They stay on the devices while any of their users is on them: a user's
    :meth:`offload` moves them to host memory only when no other user is
    resident (roles that take turns on the devices, ``placement.offload``),
    and :meth:`onload` brings them back.  Read :attr:`state` at each use, not
    once: offload replaces the arrays.
    """

    def __init__(self, state: Any, graphdef: Any = None, *, owner: Any = None):
        self.graphdef = graphdef
        self.owner = owner
        self._state = state
        self._lock = threading.Lock()
        self._on_device = True
        self._resident: set[int] = set()
        self._users: set[int] = set()

    @property
    def state(self) -> Any:
        with self._lock:
            return self._state

    @property
    def users(self) -> int:
        """How many roles hold these weights."""
        return len(self._users)

    def join(self, user: Any) -> None:
        """Registers ``user`` (a role, resident on the devices)."""
        with self._lock:
            self._users.add(id(user))
            self._resident.add(id(user))

    def model(self) -> Decoder:
        """A new module over these arrays (no copy), for a role to add adapters to."""
        return nnx.merge(self.graphdef, self.state)

    def offload(self, user: Any) -> None:
        with self._lock:
            self._resident.discard(id(user))
            if self._on_device and not self._resident:
                self._state = weights.offload(self._state)
                self._on_device = False

    def onload(self, user: Any) -> None:
        with self._lock:
            if not self._on_device:
                self._state = weights.onload(self._state)
                self._on_device = True
            self._resident.add(id(user))


_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_base(run_config: Any, mesh: jax.sharding.Mesh, *, seed: int) -> SharedBase:
    """The base model of ``run_config.model`` (without adapters, in the compute
    dtype) on ``mesh``, built once per run and mesh: every role of the run on
    the same devices with the same mesh shape gets the same arrays.  Roles on
    other devices (a disaggregated placement) build their own."""
    key = (id(run_config), seed, tuple(d.id for d in mesh.devices.flat), tuple(mesh.shape.items()))
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        # ``owner`` keeps the run config alive with the entry, so its id is not reused meanwhile.
        if entry is None or entry.owner is not run_config:
            graphdef, state = nnx.split(load_model(run_config.model, mesh=mesh, seed=seed))
            entry = SharedBase(state, graphdef, owner=run_config)
            _SHARED[key] = entry
    return entry


def policy_model(run_config: Any, mesh: jax.sharding.Mesh, *, seed: int, master: bool = False,
                 user: Any = None) -> tuple[Decoder, SharedBase | None]:
    """The policy a role holds on ``mesh``, and its shared frozen base.

    With ``model.lora``: the run's :func:`shared_base` on ``mesh`` (joined by
    ``user``) plus adapters drawn from ``seed`` (the same for every policy
    role, so trainer and rollout start identical).  Without: the model of
    :func:`rlpipe.models.loading.load_policy` (``master``: float32
    parameters) and ``None``."""
    lora = getattr(run_config.model, "lora", None)
    if lora is None:
        return load_policy(run_config.model, mesh=mesh, seed=seed, master=master), None
    base = shared_base(run_config, mesh, seed=seed)
    base.join(user)
    return add_adapters(base.model(), lora, mesh=mesh, seed=seed), base


class ModelHolder:
    """A decoder split into graphdef and parameters on a role's mesh, with offload.

    It can hold several policy versions at once (the rollout of an asynchronous
    run keeps the versions its upcoming steps still need); ``state`` is the
    newest.
    """

    def __init__(self, model: Decoder, placement: RolePlacement, mesh: jax.sharding.Mesh, *,
                 shared: SharedBase | None = None):
        self.placement = placement
        self.mesh = mesh
        #: With LoRA: the frozen base weights, held once for every version
        #: (the versions are then adapter states), maybe shared with other roles
        #: on the mesh; a reference of the base model holds only ``shared``
        #: (its versions are empty).  ``None``: each version is the whole state.
        self.shared = shared
        adapted = bool(jax.tree_util.tree_leaves(nnx.state(model, LoRAParam)))
        if adapted:
            self.graphdef, state, base = nnx.split(model, LoRAParam, ...)
            if shared is None:
                self.shared = SharedBase(base)
        elif shared is not None:
            self.graphdef, state = nnx.graphdef(model), nnx.State({})
        else:
            self.graphdef, state = nnx.split(model)
        if self.shared is not None:
            self.shared.join(self)
        self.dtype = model.dtype
        self.config = model.config
        self.shardings = shardings_for(state, mesh)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        #: Rows (the batch dimension of inputs, KV cache and outputs) split over the data axis ``fsdp``.
        self.rows = row_sharding(mesh)
        self._lock = threading.Lock()
        self._states: dict[int, Any] = {0: state}
        self._on_device = True

    @property
    def base(self) -> Any:
        """The frozen base weights (:attr:`shared`'s), or ``None``."""
        return None if self.shared is None else self.shared.state

    @property
    def adapters(self) -> bool:
        """Whether the versions are LoRA adapters over a shared :attr:`base`."""
        return self.shared is not None and bool(jax.tree_util.tree_leaves(self.shardings))

    def _full(self, state: Any) -> Any:
        """A version's parameters as the whole model's state: with LoRA the
        base and the version's adapters composed (no copy)."""
        return state if self.shared is None else nnx.merge_state(self.shared.state, state)

    @property
    def state(self) -> Any:
        """The newest version's parameters (the whole model's state)."""
        with self._lock:
            return self._full(self._states[max(self._states)])

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._states)

    def version_state(self, version: int) -> Any:
        """The parameters of ``version``, dropping every older version (no later
        step needs them: steps ask for non-decreasing versions)."""
        with self._lock:
            for v in [v for v in self._states if v < version]:
                del self._states[v]
            return self._full(self._states[version])

    def offload(self) -> None:
        with self._lock:
            if self._on_device:
                self._states = weights.offload(self._states)
                if self.shared is not None:
                    self.shared.offload(self)
                self._on_device = False

    def onload(self) -> None:
        with self._lock:
            if not self._on_device:
                if self.shared is not None:
                    self.shared.onload(self)
                self._states = weights.onload(self._states)
                self._on_device = True

    def put(self, version: int, state: Any) -> None:
        """Installs the parameters of ``version`` (already laid out for this
        role, as :attr:`shardings`): with LoRA, its adapters only."""
        with self._lock:
            self._states[version] = state if self._on_device else weights.offload(state)
