"""Run checkpoints with orbax: what a run needs to continue exactly where it was.

A checkpoint of global step ``k`` lives in ``<run-dir>/checkpoints/<k>/`` and
holds, as orbax items:

* ``stage.<role>``: every stateful stage's ``state()`` after its barrier of
  step ``k`` (trainer and critic parameters and optimizer states), arrays
  only, as a nested tree of plain dicts that keeps the state's structure
  (see :func:`tree_of`): the trainer's item reads
  ``{"params": {"layers": {"0": {...}}}, "opt_state": {"0": {"mu": ...}}}``;
* ``pending``: the fields the head stages (rollout) produced for steps
  ``k + 1 .. k + lag`` of an asynchronous run: generated, not yet trained on,
  as ``{role: {"<step>": {"<index>": {field: array}}}}``;
* ``meta`` (JSON): the step, the policy version, the data position, the seed,
  the scalar leaves of the stage states (``scalars``: ``{role: nested tree}``,
  the same nesting as the arrays), and a fingerprint of the config keys that
  must not change between runs; with ``model.lora``, ``base``: the identity
  of the base model (:func:`base_identity`), which the checkpoint holds no
  copy of (the trainer's ``params`` are the adapters alone).

Saves are asynchronous (the arrays are already in host memory when a save
starts) and atomic: orbax writes into a temporary directory and renames it,
so a crash mid-save never shadows the previous checkpoint.  ``keep`` bounds
how many are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlpipe.core.errors import UsageError

#: Bumped when the checkpoint layout changes incompatibly.
FORMAT = 2


class CheckpointError(UsageError):
    """A checkpoint that is missing, unreadable or does not fit this run (exit 2)."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _entry(entry: Any) -> str:
    """The plain-dict key of one pytree path entry: a dict key, an attribute
    name (optax NamedTuples, nnx Variables' ``value``) or a sequence index."""
    if isinstance(entry, jax.tree_util.DictKey):
        return str(entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return entry.name
    if isinstance(entry, jax.tree_util.SequenceKey):
        return str(entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return str(entry.key)
    return str(entry)


def keys_of(path: Sequence[Any]) -> tuple[str, ...]:
    """A pytree path (``tree_flatten_with_path``'s) as plain-dict keys."""
    return tuple(_entry(e) for e in path)


def show(keys: Sequence[str]) -> str:
    """A readable path: ``params/layers/0/mlp/up_proj/kernel``."""
    return "/".join(keys) or "(the whole state)"


def _insert(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise TypeError(f"state paths {show(keys[:i + 1])} and {show(keys)} collide as plain-dict keys")
    if not keys:
        raise TypeError("a stage state is a tree of arrays and scalars (a dict, an nnx State, ...), not a single leaf")
    if keys[-1] in node:
        raise TypeError(f"state path {show(keys)} collides with another one as plain-dict keys")
    node[keys[-1]] = value


def _lookup(tree: Any, keys: Sequence[str]) -> Any:
    """``tree[k0][k1]...``; ``KeyError`` when a key is missing."""
    for key in keys:
        if not isinstance(tree, Mapping) or key not in tree:
            raise KeyError(key)
        tree = tree[key]
    return tree


def tree_of(tree: Any, *, array: Callable[[tuple[str, ...], Any], Any] = lambda keys, x: x
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a pytree into two nested plain-dict trees that keep its
    structure, ``(arrays, scalars)``: dict keys stay keys, attribute names
    (NamedTuple fields) and sequence indices become string keys.  ``array``
    maps each array leaf (with its keys) to what the tree holds.

    Raises:
        TypeError: a leaf that is neither an array nor a JSON-able scalar.
    """
    arrays: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = keys_of(path)
        if _is_array(leaf):
            _insert(arrays, keys, array(keys, leaf))
        elif isinstance(leaf, (bool, int, float, str, np.generic)) or leaf is None:
            _insert(scalars, keys, leaf.item() if isinstance(leaf, np.generic) else leaf)
        else:
            raise TypeError(f"state leaf {show(keys)} is a {type(leaf).__name__}; a stage state holds arrays and "
                            "scalars only")
    return arrays, scalars


def from_tree(template: Any, arrays: Any, scalars: Any, *, where: str = "the checkpoint") -> Any:
    """The inverse of :func:`tree_of`, shaped like ``template`` (its pytree
    node types: nnx States, optax NamedTuples, ...).

    Raises:
        CheckpointError: a leaf of ``template`` that the trees lack, named.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        keys = keys_of(path)
        try:
            out.append(_lookup(arrays if _is_array(leaf) else scalars, keys))
        except KeyError:
            what = "array" if _is_array(leaf) else "scalar"
            raise CheckpointError(f"{where}: no {what} {show(keys)}; the stage state changed since the checkpoint "
                                  "was written") from None
    return jax.tree_util.tree_unflatten(treedef, out)


def _leaves(tree: Any) -> dict[tuple[str, ...], Any]:
    """``{keys: leaf}`` of a nested tree (of arrays or orbax array metadata)."""
    return {keys_of(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _pending_save(pending: Mapping[str, Mapping[int, Mapping[int, Mapping[str, Any]]]]) -> dict[str, Any]:
    """``{role: {"<step>": {"<index>": {field: array}}}}`` (orbax keys are strings)."""
    out: dict[str, Any] = {}
    for role, by_step in pending.items():
        for step, by_index in by_step.items():
            for index, fields in by_index.items():
                for name, value in fields.items():
                    value = np.asarray(value)
                    if value.dtype == object:
                        raise TypeError(f"{role} produced field {name!r} as Python objects; only arrays can be checkpointed")
                    out.setdefault(role, {}).setdefault(str(step), {}).setdefault(str(index), {})[name] = value
    return out


def _pending_restored(tree: Mapping[str, Any]) -> dict[str, dict[int, dict[int, dict[str, np.ndarray]]]]:
    """The inverse of :func:`_pending_save`: integer steps and indices, numpy fields."""
    return {role: {int(step): {int(index): {name: np.asarray(value) for name, value in fields.items()}
                               for index, fields in by_index.items()}
                   for step, by_index in by_step.items()}
            for role, by_step in tree.items()}


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
            item = f"stage.{role}"
            arrays, scalars[role] = tree_of(state, array=lambda keys, x, item=item: _saveable(item, show(keys), x))
            if arrays:  # orbax refuses an empty item; a state of scalars only lives in meta
                items[item] = ocp.args.StandardSave(arrays)
        saved_pending = _pending_save(pending)
        if saved_pending:
            items["pending"] = ocp.args.StandardSave(saved_pending)
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
        for role, template in templates.items():
            abstract, _ = tree_of(template, array=lambda keys, v: (
                np.empty(v.shape, v.dtype) if single_process(v) is not None  # saved as numpy: see _saveable
                else jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=_restore_sharding(v))))
            if abstract or (base / f"stage.{role}").is_dir():
                self._check_shapes(base / f"stage.{role}", step, f"stage.{role}", abstract)
            if abstract:
                items[f"stage.{role}"] = ocp.args.StandardRestore(abstract)
        if meta["pending_steps"]:
            items["pending"] = ocp.args.StandardRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as exc:  # noqa: BLE001 - named by file
            raise CheckpointError(f"{base}: cannot restore the checkpoint: {_reason(exc)}") from exc
        states = {role: from_tree(templates[role], restored[f"stage.{role}"] if f"stage.{role}" in items else {},
                                  meta["scalars"].get(role, {}), where=str(base / f"stage.{role}"))
                  for role in templates}
        pending = _pending_restored(restored["pending"]) if meta["pending_steps"] else {}
        return states, pending, meta

    def restore_subtree(self, step: int, role: str, path: Sequence[Any], template: Any) -> Any:
        """Reads only the arrays of ``role``'s state under the tree path
        ``path``, a tuple of keys into it (e.g. the trainer's ``("params",)``,
        without its optimizer state), shaped and placed like ``template``.

        Keys are matched as the saved tree spells them: strings, with sequence
        indices as their decimal string (``("params", "layers", 0)`` works too).

        Raises:
            CheckpointError: naming the file and the array that is missing or
                does not match.
        """
        ocp = _ocp()
        meta = self.meta(step)
        where = self.directory / str(step) / f"stage.{role}"
        if isinstance(path, (str, bytes)):
            raise TypeError(f"restore_subtree takes a tuple of keys as its path, not the string {path!r}")
        prefix = tuple(str(k) for k in path)
        sub, _ = tree_of(template, array=lambda keys, v: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                                               sharding=_restore_sharding(v)))
        abstract: dict[str, Any] = sub
        for key in reversed(prefix):
            abstract = {key: abstract}
        if not where.is_dir():
            raise CheckpointError(f"{where}: missing from the checkpoint (the run has no {role!r} state)")
        self._check_shapes(where, step, f"stage.{role}", abstract, partial=True)
        from etils import epath

        try:
            restored = ocp.PyTreeCheckpointer().restore(
                epath.Path(where), args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True)) if sub else {}
        except Exception as exc:  # noqa: BLE001 - named by file
            raise CheckpointError(f"{where}: cannot restore the checkpoint: {_reason(exc)}") from exc
        try:
            scalars = _lookup(meta.get("scalars", {}).get(role, {}), prefix)
        except KeyError:
            scalars = {}
        return from_tree(template, _lookup(restored, prefix) if sub else {}, scalars, where=str(where))

    def _check_shapes(self, path: Path, step: int, item: str, abstract: Mapping[str, Any], *, partial: bool = False) -> None:
        """Names the first array whose saved shape differs from the run's, or
        that is missing; and, unless ``partial`` (a subtree is read), the first
        saved array that is not part of the run's state."""
        if not path.is_dir():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        try:
            from etils import epath

            metadata = _ocp().StandardCheckpointHandler().metadata(epath.Path(path))
            saved = _leaves(getattr(metadata, "tree", metadata))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read the checkpoint: {_reason(exc)}") from exc
        wanted = _leaves(abstract)
        for keys, want in wanted.items():
            if keys not in saved:
                raise CheckpointError(f"{path}: no array {show(keys)}; the model or optimizer changed since the "
                                      "checkpoint was written")
            shape = tuple(getattr(saved[keys], "shape", ()))
            if shape != tuple(want.shape):
                raise CheckpointError(f"{path}: {show(keys)} has shape {list(shape)} in the checkpoint but "
                                      f"{list(want.shape)} in this run (did the model config change?)")
        unknown = [] if partial else sorted(set(saved) - set(wanted))
        if unknown:
            raise CheckpointError(f"{path}: array {show(unknown[0])} is not part of this run's state (did the model "
                                  "or optimizer change?)")


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


# -- the base model of a LoRA run ------------------------------------------------------

#: Weight files whose bytes identify a checkpoint directory's model.
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


def base_identity(model_config: Any) -> dict[str, Any] | None:
    """What a LoRA run's checkpoints record about the base model they hold no
    copy of (they hold the adapters and the optimizer state): the preset or
    the ``architecture`` (a base drawn from ``train.seed``), or the checkpoint
    path and the SHA-256 of each of its weight files.  ``None`` without
    ``model.lora`` (the checkpoint holds the whole policy).

    Reading the files takes a while for a large model: call it once per run.
    """
    if getattr(model_config, "lora", None) is None:
        return None
    from rlpipe.runtime import pretrained

    path = model_config.path
    if not path and getattr(model_config, "architecture", None) is None and model_config.preset in pretrained.PRETRAINED:
        path = pretrained.cached_file(model_config.preset)
    if not path:
        which = "architecture" if getattr(model_config, "architecture", None) is not None else "preset"
        return {"preset": model_config.preset if which == "preset" else None, "random_init": which}
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)) \
        if path.is_dir() else []
    return {"preset": model_config.preset if not model_config.path else None, "path": str(path),
            "sha256": {p.name: pretrained.sha256_of(p) for p in files}}


def base_changes(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> list[str]:
    """Why a run's checkpoint does not fit the base model the config now
    loads: the adapters were trained on another one (another path or other
    file contents).  Empty when they fit, or when either side has no record."""
    if not saved or not current:
        return []
    out = []
    if saved.get("path") != current.get("path") and saved.get("path") and current.get("path"):
        out.append(f"the base model was {saved['path']}, now {current['path']}")
    before, now = saved.get("sha256") or {}, current.get("sha256") or {}
    for name in sorted(set(before) | set(now)):
        if before.get(name) != now.get(name):
            out.append(f"base weight file {name}: SHA-256 {str(before.get(name, '<absent>'))[:12]} in the run, "
                       f"{str(now.get(name, '<absent>'))[:12]} now")
    return out
