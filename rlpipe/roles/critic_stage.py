"""The critic stage: a value model trained at the global-batch barrier (PPO's critic)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlpipe.core.placement import RolePlacement
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.models.decoder import completion_hidden
from rlpipe.roles.optimization import (
    OptimizedState,
    attention_mask,
    flat_rows,
    group_items,
    init_optimizer_state,
    make_optimizer,
    on_mesh,
    prompts_shared_by,
)
from rlpipe.runtime import distributed
from rlpipe.runtime.devices import on_devices

#: The fields that hold one row per prompt when prompts are shared.
_PROMPT_KEYS = ("prompt", "prompt_mask")


class ValueModel(nnx.Module):
    """The critic: the policy's decoder trunk plus a scalar head."""

    def __init__(self, trunk: Any, *, seed: int):
        from rlpipe.models.decoder import Linear

        self.trunk = trunk
        # Starts at 0 so early value estimates do not swamp the returns.  A float32
        # master, like the trunk's parameters (the trunk computes in model.compute_dtype).
        self.value_head = Linear(trunk.config.hidden_size, 1, bias=True, param_dtype=jnp.float32, rngs=nnx.Rngs(params=seed))
        self.value_head.kernel[...] = jnp.zeros_like(self.value_head.kernel[...])

    def values(self, prompt, prompt_mask, completion, completion_mask, completion_attention=None):
        """``[rows, completion_len]``: the value of the state before each completion
        token (0 where ``completion_mask`` is 0); the forward pass attends to
        ``completion_attention`` (default: ``completion_mask``).  ``prompt`` may
        give each group's prompt once (:func:`~rlpipe.models.decoder.completion_hidden`)."""
        attend = completion_mask if completion_attention is None else completion_attention
        h = completion_hidden(self.trunk, prompt, prompt_mask, completion, attend)
        v = self.value_head(h)[..., 0].astype(jnp.float32)
        return jnp.where(completion_mask.astype(bool), v, 0.0)


def clipped_value_loss(values, old_values, returns, mask, clip: float):
    """PPO's clipped value loss: ``0.5 * max((v - R)^2, (clip(v) - R)^2)``,
    token-mean over valid tokens."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    per_token = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    m = mask.astype(jnp.float32)
    return jnp.sum(per_token * m) / jnp.maximum(m.sum(), 1.0)


class CriticStage(OptimizedState):
    """Values for every completion token as items pass; at the barrier, trains
    on the algorithm's returns (GAE) with the clipped value loss."""

    #: Micro-batches of whole groups give each prompt once (``completion_hidden``'s
    #: shared prompts); ``False`` repeats it per completion (to compare the two).
    share_prompts: bool = True

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext, algorithm: Any):
        run = context.run_config
        model = ValueModel(self._build_model(config, placement, context, algorithm), seed=context.seed + 1)
        self.graphdef, params = nnx.split(model)
        self.params = on_mesh(params, self.mesh)  # the trunk keeps its sharding, the head is replicated
        self.optimizer = make_optimizer(config, run.train.steps)
        self.opt_state = init_optimizer_state(self.optimizer, self.params, self.mesh)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.items: list[Batch] = []
        self.last_metrics: dict[str, float] = {}
        self._values = jax.jit(lambda params, *rows: nnx.merge(self.graphdef, params).values(*rows))
        self._accumulate = jax.jit(self._accumulate_fn, donate_argnums=(0,))
        self._apply = jax.jit(self._apply_fn, donate_argnums=(0, 1))  # the accumulator is freed when dropped
        # The gradient accumulator is laid out like the parameters (so that donating it aliases).
        self._acc_shardings = (jax.tree_util.tree_map(lambda x: x.sharding, self.params), self.replicated)
        self._zeros = jax.jit(lambda params: (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.float32)),
                              out_shardings=self._acc_shardings)
        if placement.offload:
            self.offload()

    def _accumulate_fn(self, acc, params, rows, scale):
        """``acc`` (gradients, loss) plus this micro-batch's loss, weighted by ``scale``."""
        def loss_fn(p):
            v = nnx.merge(self.graphdef, p).values(rows["prompt"], rows["prompt_mask"], rows["completion"], rows["completion_mask"],
                                                   attention_mask(rows))
            return clipped_value_loss(v, rows["values"], rows["returns"], rows["completion_mask"], self.config.value_clip) * scale

        loss, grads = jax.value_and_grad(loss_fn)(params)
        return jax.lax.with_sharding_constraint((jax.tree_util.tree_map(jnp.add, acc[0], grads), acc[1] + loss), self._acc_shardings)

    def _apply_fn(self, params, opt_state, acc):
        grads, loss = acc
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def _rows(self, grouped: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """One row per completion, and how many rows share each prompt row: a
        group's (its prompt given once, ``completion_hidden``'s shared prompts)
        when micro-batches hold whole groups, else 1 (prompts repeated)."""
        rows = flat_rows(grouped)
        per = prompts_shared_by(grouped["completion"].shape[1], self.config.micro_batch_size, enabled=self.share_prompts)
        if per > 1:
            rows = {**rows, "prompt": grouped["prompt"], "prompt_mask": grouped["prompt_mask"]}
        return rows, per

    def _micro_batches(self, rows: dict[str, np.ndarray], per: int = 1):
        """Micro-batches of ``micro_batch_size`` completions; ``per`` completions
        share each row of ``rows``' prompts (:meth:`_rows`)."""
        mb = self.config.micro_batch_size
        n = len(rows["completion"])
        padded = -(-n // mb) * mb

        def size(k):
            return padded // per if k in _PROMPT_KEYS else padded

        if padded != n:  # zero rows (mask 0) so every call has one shape
            rows = {k: np.concatenate([v, np.zeros((size(k) - len(v), *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
        for lo in range(0, padded, mb):
            yield distributed.put({k: v[lo // per:(lo + mb) // per] if k in _PROMPT_KEYS else v[lo:lo + mb]
                                   for k, v in rows.items()}, self.replicated)

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        grouped = group_items([batch], self.pad_id)
        rows, per = self._rows(grouped)
        keys = ("prompt", "prompt_mask", "completion", "completion_mask", *(["completion_attention_mask"] if "completion_attention_mask" in rows else []))
        p, g, n = grouped["completion"].shape

        def compute() -> dict[str, np.ndarray]:
            with on_devices(self.mesh, context):
                outs = [self._values(self.params, *(c[k] for k in keys))
                        for c in self._micro_batches({k: rows[k] for k in keys}, per)]
                return {"values": np.concatenate(distributed.to_host(outs))[: p * g].reshape(p, g, n)}

        values = distributed.share(self.mesh, compute)["values"]  # every process gets them (multi-process runs)
        out = batch.add(values=values)
        self.items.append(out)
        return out

    def on_barrier(self, *, context: StageContext) -> None:
        grouped = group_items(self.items, self.pad_id)
        self.items = []
        if not distributed.owns(self.mesh):
            return  # trained by the processes that hold its devices (multi-process runs)
        estimate = self.algorithm.estimate(jnp.asarray(grouped["rewards"]), jnp.asarray(grouped["completion_mask"]),
                                           jnp.asarray(grouped["values"]))
        if estimate.returns is None:
            raise ValueError(f"advantage estimator {self.algorithm.config.advantage!r} gives no returns to train a critic on")
        rows, per = self._rows(grouped)
        rows = {k: rows[k] for k in ("prompt", "prompt_mask", "completion", "completion_mask", "completion_attention_mask", "values")
                if k in rows}
        rows["returns"] = np.asarray(estimate.returns, np.float32).reshape(rows["completion"].shape)
        n_chunks = -(-len(rows["completion"]) // self.config.micro_batch_size)
        with on_devices(self.mesh, context):
            acc = self._zeros(self.params)
            for chunk in self._micro_batches(rows, per):
                acc = self._accumulate(acc, self.params, chunk, jnp.float32(1.0 / n_chunks))
            self.params, self.opt_state, loss = self._apply(self.params, self.opt_state, acc)
            self.last_metrics = {"value_loss": float(distributed.to_host(loss))}
