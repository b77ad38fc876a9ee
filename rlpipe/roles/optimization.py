"""The optimisation step shared by the trainable roles (trainer, critic).

An optax AdamW with warm-up and clipping (:func:`make_optimizer`), its state
laid out like the parameters (:func:`init_optimizer_state`), the parameters
and optimizer state of a role with offload and publishing
(:class:`OptimizedState`), and the grouping of a global batch's items into
rows (:func:`group_items`, :func:`flat_rows`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rlpipe.core.placement import RolePlacement, make_mesh
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch
from rlpipe.models.generation import bucket_length, left_pad
from rlpipe.models.loading import load_model, load_tokenizer
from rlpipe.roles.model_holder import policy_model
from rlpipe.runtime import weights


def group_items(items: list[Batch], pad_id: int) -> dict[str, np.ndarray]:
    """Concatenates a global batch's items (host arrays): prompts left-padded to
    one bucket ``[P, L]``, per-completion fields ``[P, G, ...]``."""
    plen = bucket_length(max(int(np.asarray(b["prompt_mask"]).sum(axis=1).max(initial=1)) for b in items))
    out: dict[str, list] = {}
    for b in items:
        toks, mask = left_pad(b["prompt_tokens"], b["prompt_mask"], plen, pad_id)
        fields = {"prompt": toks, "prompt_mask": mask,
                  "completion": np.asarray(b["completion_tokens"]),
                  "completion_mask": np.asarray(b["completion_mask"]).astype(np.float32),
                  "rewards": np.asarray(b["rewards"], np.float32)}
        if "policy_version" in b:
            fields["policy_version"] = np.asarray(b["policy_version"])
        if "completion_attention_mask" in b:
            fields["completion_attention_mask"] = np.asarray(b["completion_attention_mask"]).astype(np.float32)
        for name in ("rollout_logprobs", "ref_logprobs", "values"):
            if name in b:
                fields[name] = np.asarray(b[name], np.float32)
        for k, v in fields.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def flat_rows(grouped: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per completion: prompts repeated per generation, ``[P * G, ...]``."""
    p, g, n = grouped["completion"].shape
    rows = {"prompt": np.repeat(grouped["prompt"], g, 0), "prompt_mask": np.repeat(grouped["prompt_mask"], g, 0)}
    if "policy_version" in grouped:
        rows["policy_version"] = np.repeat(grouped["policy_version"], g)
    for k in ("completion", "completion_mask", "completion_attention_mask", "rollout_logprobs", "ref_logprobs", "values"):
        if k in grouped:
            rows[k] = grouped[k].reshape(p * g, n)
    return rows


def prompts_shared_by(group: int, micro_batch: int, shards: int = 1, *, enabled: bool = True) -> int:
    """How many completion rows of a micro-batch share each prompt row
    (``sequence_logprobs``'s shared prompts): ``group`` when micro-batches of
    ``micro_batch`` rows hold whole groups, the same number on each of
    ``shards`` row shards; 1 (each row its own copy of the prompt) otherwise."""
    whole = group > 1 and micro_batch % group == 0 and (micro_batch // group) % shards == 0
    return group if enabled and whole else 1


def attention_mask(rows: Any) -> Any:
    """The completion tokens a forward pass attends to: every token of an
    agentic episode, the environment's included (``completion_attention_mask``);
    otherwise the scored ones (``completion_mask``)."""
    return rows["completion_attention_mask"] if "completion_attention_mask" in rows else rows["completion_mask"]


def make_optimizer(config: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW (default) or SGD, a constant or warmup-plus-cosine schedule, and
    gradient clipping by global norm."""
    if config.schedule == "warmup-cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1),
                                                max(total_steps, config.warmup_steps + 1), end_value=0.0)
    elif config.warmup_steps:
        lr = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    else:
        lr = config.learning_rate
    opt = (optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
           if config.optimizer == "adamw" else optax.sgd(lr))
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip else []
    return optax.chain(*parts, opt)


def on_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``tree`` with every array that is not already spread over ``mesh`` (the
    optimizer's step count, a tiny head) replicated on it, committed, so that
    offload and onload bring it back to the same devices."""
    devices, replicated = set(mesh.devices.flat), NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(lambda x: x if set(x.sharding.device_set) == devices else jax.device_put(x, replicated), tree)


def init_optimizer_state(optimizer: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """``optimizer.init(params)`` with every per-parameter leaf (AdamW's
    moments) sharded like its parameter and the rest (step counts)
    replicated.  Left to itself, ``jit(init)`` returns the zero moments
    replicated on every device: ``fsdp`` times the memory until the first
    update re-shards them."""
    by_path = [(jax.tree_util.keystr(p), x.shape, x.sharding) for p, x in jax.tree_util.tree_leaves_with_path(params)]
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        for suffix, shape, sharding in by_path:
            if key.endswith(suffix) and leaf.shape == shape:
                return sharding
        return replicated

    shardings = jax.tree_util.tree_map_with_path(pick, jax.eval_shape(optimizer.init, params))
    return jax.jit(optimizer.init, out_shardings=shardings)(params)


class OptimizedState:
    """Parameters and optimizer state that move to host memory between uses."""

    params: Any
    opt_state: Any
    _on_device: bool = True

    #: With ``model.lora``: the frozen base weights (in the compute dtype; no
    #: gradient, no optimizer state), shared with the run's other roles on
    #: the same mesh (:class:`rlpipe.roles.model_holder.SharedBase`).
    base_weights: Any = None

    @property
    def frozen(self) -> Any:
        """The parameters the model needs besides ``params``: the frozen base, or ``None``."""
        return None if self.base_weights is None else self.base_weights.state

    def _build_model(self, config: Any, placement: RolePlacement, context: BuildContext, algorithm: Any, *,
                     policy: bool = False) -> Any:
        """The common start of a trainable role's constructor: its config,
        algorithm, mesh and pad id; returns its model (initialised or loaded
        on the mesh) with float32 master parameters — the optimizer state
        follows them — computing in ``model.compute_dtype``.  ``policy``:
        the policy (:func:`rlpipe.roles.model_holder.policy_model`), with
        ``model.lora``'s adapters when set: float32 adapters over a frozen base
        in the compute dtype (:attr:`base_weights`)."""
        self.config = config
        self.algorithm = algorithm
        self.mesh = make_mesh(placement)
        self.pad_id = load_tokenizer(context.run_config.model).pad_id
        if policy:
            model, self.base_weights = policy_model(context.run_config, self.mesh, seed=context.seed, master=True,
                                                    user=self)
            return model
        return load_model(context.run_config.model, mesh=self.mesh, seed=context.seed, master=True)

    def offload(self) -> None:
        if self._on_device:
            self.params, self.opt_state = weights.offload((self.params, self.opt_state))
            if self.base_weights is not None:
                self.base_weights.offload(self)
            self._on_device = False

    def onload(self) -> None:
        if not self._on_device:
            if self.base_weights is not None:
                self.base_weights.onload(self)
            self.params, self.opt_state = weights.onload((self.params, self.opt_state))
            self._on_device = True

    def state(self) -> Any:
        """Parameters and optimizer state as copies in host memory: later
        updates donate the device buffers, the snapshot stays valid.  The
        frozen parameters are not part of it (they are rebuilt from the
        config: with LoRA a checkpoint holds the adapters, not the base)."""
        return {"params": weights.offload(self.params), "opt_state": weights.offload(self.opt_state)}

    def restore(self, state: Any) -> None:
        """Installs ``state`` (host or device arrays) on this stage's shardings."""
        self.params, self.opt_state = weights.place_like((state["params"], state["opt_state"]),
                                                         (self.params, self.opt_state))


class NonFiniteLossError(RuntimeError):
    """Too many updates had a non-finite loss or gradient."""
