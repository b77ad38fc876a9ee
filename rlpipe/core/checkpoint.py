"""Run checkpoints with orbax: what a run needs to continue exactly where it was.

A checkpoint of global step ``k`` lives in ``<run-dir>/checkpoints/<k>/`` and
holds, as orbax items:

* ``stage.<role>``: every stateful stage's ``state()`` after its barrier of
  step ``k`` (trainer and critic parameters and optimizer states), arrays
  only, keyed by their pytree path;
* ``pending``: the fields the head stages (rollout) produced for steps
  ``k + 1 .. k + lag`` of an asynchronous run: generated, not yet trained on;
* ``meta`` (JSON): the step, the policy version, the data position, the seed,
  the scalar leaves of the stage states, and a fingerprint of the config
  keys that must not change between runs.

Saves are asynchronous (the arrays are already in host memory when a save
starts) and atomic: orbax writes into a temporary directory and renames it,
so a crash mid-save never shadows the previous checkpoint.  ``keep`` bounds
how many are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlpipe.core.errors import UsageError

#: Bumped when the checkpoint layout changes incompatibly.
FORMAT = 1


class CheckpointError(UsageError):
    """A checkpoint that is missing, unreadable or does not fit this run (exit 2)."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def flatten(tree: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a pytree into ``{path: array}`` and ``{path: scalar}`` (JSON-able)."""
    arrays, scalars = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path)
        if _is_array(leaf):
            arrays[key] = leaf
        elif isinstance(leaf, (bool, int, float, str, np.generic)) or leaf is None:
            scalars[key] = leaf.item() if isinstance(leaf, np.generic) else leaf
        else:
            raise TypeError(f"state leaf {key} is a {type(leaf).__name__}; a stage state holds arrays and scalars only")
    return arrays, scalars


def unflatten(template: Any, arrays: Mapping[str, Any], scalars: Mapping[str, Any]) -> Any:
    """The inverse of :func:`flatten`, shaped like ``template``."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, _ in leaves:
        key = jax.tree_util.keystr(path)
        out.append(arrays[key] if key in arrays else scalars[key])
    return jax.tree_util.tree_unflatten(treedef, out)


def _pending_arrays(pending: Mapping[str, Mapping[int, Mapping[int, Mapping[str, Any]]]]) -> dict[str, np.ndarray]:
    out = {}
    for role, by_step in pending.items():
        for step, by_index in by_step.items():
            for index, fields in by_index.items():
                for name, value in fields.items():
                    value = np.asarray(value)
                    if value.dtype == object:
                        raise TypeError(f"{role} produced field {name!r} as Python objects; only arrays can be checkpointed")
                    out[f"{role}|{step}|{index}|{name}"] = value
    return out


def _pending_tree(flat: Mapping[str, Any]) -> dict[str, dict[int, dict[int, dict[str, np.ndarray]]]]:
    out: dict = {}
    for key, value in flat.items():
        role, step, index, name = key.split("|")
        out.setdefault(role, {}).setdefault(int(step), {}).setdefault(int(index), {})[name] = np.asarray(value)
    return out


class RunCheckpointer:
    """Saves and restores run checkpoints in ``directory`` (orbax)."""

    def __init__(self, directory: str | Path, *, keep: int = 3, asynchronous: bool = True, primary: bool = True):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous,
                                               create=primary)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as exc:  # noqa: BLE001 - an unreadable directory, reported by path
            raise CheckpointError(f"{self.directory}: cannot open the checkpoint directory: {exc}") from exc

    # -- writing -------------------------------------------------------------------

    def save(self, step: int, *, states: Mapping[str, Any], pending: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Starts saving checkpoint ``step``; returns once the arrays are captured."""
        ocp = _ocp()
        items: dict[str, Any] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for role, state in states.items():
            arrays, scalars[role] = flatten(state)
            arrays = {k: _saveable(f"stage.{role}", k, v) for k, v in arrays.items()}
            items[f"stage.{role}"] = ocp.args.StandardSave(arrays)
        flat_pending = _pending_arrays(pending)
        if flat_pending:
            items["pending"] = ocp.args.StandardSave(flat_pending)
        record = {"format": FORMAT, "step": step, "roles": sorted(states), "scalars": scalars,
                  "pending_steps": sorted({s for by_step in pending.values() for s in by_step}), **meta}
        items["meta"] = ocp.args.JsonSave(record)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # -- reading -------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def meta(self, step: int) -> dict[str, Any]:
        ocp = _ocp()
        path = self.directory / str(step) / "meta"
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as exc:  # noqa: BLE001 - named by file
            raise CheckpointError(f"{path}: cannot read the checkpoint metadata: {_reason(exc)}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an rlpipe checkpoint of format {FORMAT}")
        return meta

    def restore(self, step: int, *, templates: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Reads checkpoint ``step``.

        Args:
            templates: ``role -> state()`` of the freshly built stages; gives
                each restored array its shape, dtype and placement.

        Returns:
            ``(states, pending, meta)``.

        Raises:
            CheckpointError: naming the file and the role or key that is
                missing or does not match.
        """
        ocp = _ocp()
        meta = self.meta(step)
        base = self.directory / str(step)
        missing = sorted(set(templates) - set(meta["roles"]))
        extra = sorted(set(meta["roles"]) - set(templates))
        if missing or extra:
            parts = ([f"has no state for role(s) {', '.join(missing)}"] if missing else []) + \
                    ([f"holds state for role(s) {', '.join(extra)} that this run does not have"] if extra else [])
            raise CheckpointError(f"{base}: the checkpoint {' and '.join(parts)}; the roles changed since it was written")
        items: dict[str, Any] = {}
        abstract_by_role = {}
        for role, template in templates.items():
            arrays, _ = flatten(template)
            abstract = {k: np.empty(v.shape, v.dtype) if single_process(v) is not None  # saved as numpy: see _saveable
                        else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_restore_sharding(v)) for k, v in arrays.items()}
            self._check_shapes(base / f"stage.{role}", step, f"stage.{role}", abstract)
            abstract_by_role[role] = abstract
            items[f"stage.{role}"] = ocp.args.StandardRestore(abstract)
        if meta["pending_steps"]:
            items["pending"] = ocp.args.StandardRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as exc:  # noqa: BLE001 - named by file
            raise CheckpointError(f"{base}: cannot restore the checkpoint: {_reason(exc)}") from exc
        states = {role: unflatten(templates[role], restored[f"stage.{role}"], meta["scalars"].get(role, {}))
                  for role in templates}
        pending = _pending_tree(restored["pending"]) if meta["pending_steps"] else {}
        return states, pending, meta

    def restore_subtree(self, step: int, role: str, prefix: str, template: Any) -> Any:
        """Reads only the arrays of ``role``'s state under ``prefix`` (e.g. the
        trainer's ``['params']``, without its optimizer state), shaped and
        placed like ``template``.

        Raises:
            CheckpointError: naming the file and the array that is missing or
                does not match.
        """
        ocp = _ocp()
        self.meta(step)
        path = self.directory / str(step) / f"stage.{role}"
        arrays, _ = flatten(template)
        abstract = {prefix + k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_restore_sharding(v))
                    for k, v in arrays.items()}
        if not path.is_dir():
            raise CheckpointError(f"{path}: missing from the checkpoint (the run has no {role!r} state)")
        self._check_shapes(path, step, f"stage.{role}", abstract, partial=True)
        from etils import epath

        try:
            restored = ocp.PyTreeCheckpointer().restore(
                epath.Path(path), args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True))
        except Exception as exc:  # noqa: BLE001 - named by file
            raise CheckpointError(f"{path}: cannot restore the checkpoint: {_reason(exc)}") from exc
        return unflatten(template, {k[len(prefix):]: v for k, v in restored.items()}, {})

    def _check_shapes(self, path: Path, step: int, item: str, abstract: Mapping[str, Any], *, partial: bool = False) -> None:
        """Names the first array whose saved shape differs from the run's, or
        that is missing; and, unless ``partial`` (a subtree is read), the first
        saved array that is not part of the run's state."""
        if not path.is_dir():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        try:
            from etils import epath

            saved = dict(_ocp().StandardCheckpointHandler().metadata(epath.Path(path)))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read the checkpoint: {_reason(exc)}") from exc
        for key, want in abstract.items():
            if key not in saved:
                raise CheckpointError(f"{path}: no array {key}; the model or optimizer changed since the checkpoint was written")
            got = saved[key]
            shape = tuple(getattr(got, "shape", ()))
            if shape != tuple(want.shape):
                raise CheckpointError(f"{path}: {key} has shape {list(shape)} in the checkpoint but {list(want.shape)} "
                                      "in this run (did the model config change?)")
        unknown = [] if partial else sorted(set(saved) - set(abstract))
        if unknown:
            raise CheckpointError(f"{path}: array {unknown[0]} is not part of this run's state (did the model or optimizer change?)")


def single_process(x: Any) -> int | None:
    """In a multi-process run, the one process whose devices hold all of array
    ``x`` (a role placed on one process's devices), else ``None``."""
    if not isinstance(x, jax.Array) or jax.process_count() == 1:
        return None
    procs = {d.process_index for d in x.sharding.device_set}
    return next(iter(procs)) if len(procs) == 1 else None


def _saveable(item: str, key: str, x: Any) -> Any:
    """What orbax can write for ``x`` in a multi-process run.

    orbax writes arrays spread over several processes collectively, but takes
    an array held by a single process for a per-host array and refuses it.
    Process 0's such arrays are written as numpy instead (orbax writes numpy
    from process 0; the others pass a placeholder of the same shape, unused).
    An array on another single process has no such route.
    """
    owner = single_process(x)
    if owner is None:
        return x
    if owner != 0:
        raise CheckpointError(f"{item}: {key} lives on the devices of process {owner} only; a multi-process checkpoint "
                              "can hold such arrays only from process 0 (place the role on devices of process 0 or of "
                              "several processes)")
    return np.asarray(jax.device_get(x)) if jax.process_index() == 0 else np.zeros(x.shape, x.dtype)


def _restore_sharding(x: Any) -> Any:
    """Restore straight into the device layout (never pinned host memory first)."""
    if isinstance(x, jax.Array):
        return x.sharding.with_memory_kind("device")
    if getattr(x, "sharding", None) is not None:  # an abstract array that says where it goes
        return x.sharding
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # jax.devices()[0] is process 0's


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:300]
