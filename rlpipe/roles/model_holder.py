"""A decoder's parameters held on a role's mesh, by policy version, with offload.

The rollout and reference stages hold their model this way: split into
graphdef and parameters, laid out with :func:`rlpipe.models.sharding.shardings_for`,
moved to host memory and back when the plan offloads the role.  Their inputs
(and KV caches) are split by rows over the mesh's ``fsdp`` axis (``rows``):
data-parallel inference, each device computing its share of the rows.
"""

from __future__ import annotations

import threading
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlpipe.core.placement import RolePlacement
from rlpipe.models.decoder import Decoder
from rlpipe.models.generation import row_sharding
from rlpipe.models.sharding import shardings_for
from rlpipe.runtime import weights


class ModelHolder:
    """A decoder split into graphdef and parameters on a role's mesh, with offload.

    It can hold several policy versions at once (the rollout of an asynchronous
    run keeps the versions its upcoming steps still need); ``state`` is the
    newest.
    """

    def __init__(self, model: Decoder, placement: RolePlacement, mesh: jax.sharding.Mesh):
        self.placement = placement
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
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
    def state(self) -> Any:
        with self._lock:
            return self._states[max(self._states)]

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._states)

    def version_state(self, version: int) -> Any:
        """The parameters of ``version``, dropping every older version (no later
        step needs them: steps ask for non-decreasing versions)."""
        with self._lock:
            for v in [v for v in self._states if v < version]:
                del self._states[v]
            return self._states[version]

    def offload(self) -> None:
        with self._lock:
            if self._on_device:
                self._states = weights.offload(self._states)
                self._on_device = False

    def onload(self) -> None:
        with self._lock:
            if not self._on_device:
                self._states = weights.onload(self._states)
                self._on_device = True

    def put(self, version: int, state: Any) -> None:
        """Installs the parameters of ``version`` (already laid out for this role)."""
        with self._lock:
            self._states[version] = state if self._on_device else weights.offload(state)
