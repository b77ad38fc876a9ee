"""The trainer stage: policy-gradient updates at the global-batch barrier.

Items arriving during a global batch are kept (they are small host arrays);
at the barrier the trainer

1. computes advantages with its algorithm (per group of completions);
2. recomputes the current policy's log-probs of every completion (the "old"
   log-probs the PPO ratio is taken against; the rollout's own log-probs are
   kept for truncated importance sampling of stale rollouts) — a forward pass
   over the whole global batch, *skipped when it cannot matter* (below);
3. for ``num_iterations`` passes, splits the rows into mini-batches, and for
   each accumulates gradients over micro-batches and applies one optax update.
   The loss's normalisers (valid tokens, valid completions) are counted over
   the whole mini-batch before it is split and passed into each micro-batch's
   loss, so the micro-batch losses sum to the mini-batch loss and the update
   does not depend on ``micro_batch_size``.  Gradients accumulate inside jit,
   into a donated buffer (one call per micro-batch).  The log-probs and the
   entropy come from one forward pass (``sequence_logprobs(...,
   with_entropy=True)``);
4. publishes the new weights (policy version + 1) to its subscribers — the
   rollout's ``load_weights``.  It is a :class:`rlpipe.core.stage.WeightPublisher`
   (``subscribe`` / ``publish``): the driver subscribes every stage that is a
   :class:`rlpipe.core.stage.WeightReceiver`, whatever its role is called.

Every device computation is a jitted pure function of (params, optimizer
state, arrays): ``nnx.split`` / ``nnx.merge`` happen inside the jit
boundary, the optimizer state and the gradient accumulator are donated.

**When the old-log-prob pass is skipped.**  The old log-probs are the
current weights' log-probs *before any update of this global batch*, whatever
policy version generated the rows (a stale row's behaviour policy enters only
through ``rollout_logprobs``, in truncated importance sampling).  When the
global batch gets exactly one update — ``num_iterations == 1`` and one
mini-batch (``mini_batch_size`` null or equal to the global batch) — every
row is used by the very weights the pass would run with, so the pass would
recompute the training forward's own log-probs: the trainer skips it and
takes ``jax.lax.stop_gradient(logp)`` of the training forward as the old
log-probs.  The ratio is then exactly 1 and its gradient is ``grad logp``,
as with the pass; loss, metrics and update are the same (up to float
rounding between two compiled forwards).  With several mini-batches or
iterations, every update after the first sees rows the weights have moved
away from, so the pass runs.  Stale rows (``train.max_staleness > 0``) do
not force the pass: the old log-probs never were the rollout's.  The metric
``old_logprobs_skipped`` (1 or 0) says which happened, and the ``train``
span's ``old_logprobs`` argument says ``fused`` or ``pass`` (a ``logprobs``
span appears only with the pass).  :attr:`TrainerStage.fuse_old_logprobs`
set to ``False`` always runs the pass.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
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
from rlpipe.models.decoder import sequence_logprobs
from rlpipe.models.generation import row_shards
from rlpipe.models.lora import LoRAParam
from rlpipe.models.sharding import shardings_for
from rlpipe.plugins.algorithms import losses
from rlpipe.roles.optimization import (
    NonFiniteLossError,
    OptimizedState,
    attention_mask,
    flat_rows,
    group_items,
    init_optimizer_state,
    make_optimizer,
    prompts_shared_by,
)
from rlpipe.roles.rollout import sampling_temperature
from rlpipe.runtime import distributed
from rlpipe.runtime.devices import on_devices


def _takes(loss: Callable[..., Any], name: str, *, var_keyword: bool = True) -> bool:
    """Whether ``loss`` accepts the keyword ``name``: a parameter of that name,
    or (with ``var_keyword``) ``**kwargs``."""
    try:
        params = inspect.signature(loss).parameters.values()
    except (TypeError, ValueError):
        return var_keyword
    return any((var_keyword and p.kind is p.VAR_KEYWORD) or (p.name == name and p.kind is not p.POSITIONAL_ONLY)
               for p in params)


def _takes_entropy(loss: Callable[..., Any]) -> bool:
    """Whether ``loss`` accepts ``entropy=``."""
    return _takes(loss, "entropy")


def _normalisers(mask: np.ndarray, share: float) -> losses.Normalisers:
    """:func:`losses.normalisers` on the host: a mini-batch's valid tokens and
    completions (at least 1 each), and a micro-batch's share of its rows."""
    m = np.asarray(mask).astype(bool)
    return losses.Normalisers(tokens=np.asarray(max(int(m.sum()), 1), np.float32),
                              sequences=np.asarray(max(int((m.sum(axis=-1) > 0).sum()), 1), np.float32),
                              share=np.asarray(share, np.float32))


def _combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A mini-batch's metrics from its micro-batches' (host values): each
    micro-batch reports its share, so they sum; ``*_max`` metrics take the maximum."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = v if k not in out else (np.maximum(out[k], v) if k.endswith("_max") else out[k] + v)
    return out


class TrainerStage(OptimizedState):
    """The policy update.  See the module docstring for what happens when.

    Attributes:
        fuse_old_logprobs: skip the old-log-prob pass when the global batch
            gets one update (the module docstring says why that is exact);
            ``False`` always runs it (to compare the two).
    """

    fuse_old_logprobs: bool = True
    #: Each micro-batch gives every GRPO group's prompt once (``sequence_logprobs``'s
    #: shared prompts): its tokens go through the model once, not once per completion.
    #: Used when micro-batches hold whole groups split evenly over the row shards;
    #: ``False`` repeats the prompts (to compare the two).
    share_prompts: bool = True

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext, algorithm: Any):
        run = context.run_config
        model = self._build_model(config, placement, context, algorithm, policy=True)
        #: ``model.lora``: only the adapters train (``params``); the base is ``frozen``.
        self.lora = getattr(run.model, "lora", None)
        if self.lora is not None:
            # The base's arrays are self.base_weights' (shared with the run's roles on this mesh).
            self.graphdef, params, _ = nnx.split(model, LoRAParam, ...)
        else:
            self.graphdef, params = nnx.split(model)
        self.shardings = shardings_for(params, self.mesh)
        self.temperature = sampling_temperature(run)
        self.optimizer = make_optimizer(config, run.train.steps * config.num_iterations)
        self.params = params
        self.opt_state = init_optimizer_state(self.optimizer, params, self.mesh)
        self.version = 0
        self.skipped_updates = 0
        self.items: list[Batch] = []
        self.subscribers: list[Callable[[Any, int], None]] = []
        self.last_metrics: dict[str, float] = {}
        fsdp = self.mesh.shape.get("fsdp", 1)
        # Rows are split over the fsdp axis (data parallel) when it exists and divides them.
        split = fsdp > 1 and config.micro_batch_size % fsdp == 0
        self.row_sharding = NamedSharding(self.mesh, PartitionSpec("fsdp") if split else PartitionSpec())
        self._accumulate = jax.jit(self._accumulate_fn, donate_argnums=(0,))
        # The optimizer state and the accumulated gradients are donated; parameters are not,
        # because a rollout on the same mesh and dtype shares the published buffers (zero-copy sync).
        self._apply = jax.jit(self._apply_fn, donate_argnums=(1, 2))
        # The accumulator is laid out like the parameters (so that donating it aliases).
        self._acc_shardings = (jax.tree_util.tree_map(lambda x: x.sharding, params), NamedSharding(self.mesh, PartitionSpec()))
        self._zeros = jax.jit(lambda params: (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.float32)),
                              out_shardings=self._acc_shardings)
        # An update over one micro-batch: gradient and optimizer step as one program (no
        # accumulator to zero, fill and hand over; the optimizer state is donated as above).
        self._update = jax.jit(self._update_fn, donate_argnums=(1,))
        self._logprobs = jax.jit(self._logprobs_fn)
        if placement.offload:
            self.offload()

    # -- pure functions under jit ----------------------------------------------------

    def _model(self, params, frozen):
        """The policy from its trainable and (with LoRA) frozen parameters, inside jit."""
        return nnx.merge(self.graphdef, params) if frozen is None else nnx.merge(self.graphdef, params, frozen)

    def _policy_logprobs(self, params, frozen, rows):
        # Sampling used logits / T; the ratio must compare the same distribution.
        lp = sequence_logprobs(self._model(params, frozen), rows["prompt"], rows["prompt_mask"],
                               rows["completion"], attention_mask(rows), self.temperature)
        return jnp.where(rows["completion_mask"].astype(bool), lp, 0.0)  # environment tokens are not scored

    def _logprobs_fn(self, params, frozen, rows):
        return self._policy_logprobs(params, frozen, rows)

    def _accumulate_fn(self, acc, params, frozen, rows, normalisers):
        """``acc`` (gradients, loss) plus this micro-batch's; and its metrics.
        ``normalisers``: the mini-batch's counts (:func:`losses.normalisers`)."""
        def loss_fn(p):
            logp, entropy = sequence_logprobs(self._model(p, frozen), rows["prompt"], rows["prompt_mask"],
                                              rows["completion"], attention_mask(rows), self.temperature,
                                              with_entropy=True, remat=self.config.remat)
            logp = jnp.where(rows["completion_mask"].astype(bool), logp, 0.0)  # environment tokens are not scored
            if "old_logprobs" not in rows:
                # The old-log-prob pass was skipped (one update per global batch): these weights are
                # the old policy, so its log-probs are this forward's, held constant.  Whether the key
                # is there is part of the traced structure, so each case compiles once.
                batch = {**rows, "old_logprobs": jax.lax.stop_gradient(logp)}
            else:
                batch = rows
            # An Algorithm's loss always takes the entropy (its entropy_bonus term uses it when
            # configured).  A third-party algorithm object's loss(logp, rows) without an ``entropy``
            # parameter is called without it: decided from its signature here, which runs once
            # when the step is traced (not per step), so a loss swapped in after construction counts.
            algorithm_loss = self.algorithm.loss
            kwargs = {"entropy": entropy} if _takes_entropy(algorithm_loss) else {}
            # Only a loss that names ``normalisers`` uses them (one taking **kwargs may ignore them).
            if _takes(algorithm_loss, "normalisers", var_keyword=False):
                # Divides by the mini-batch's counts: the micro-batch losses and metrics sum to the mini-batch's.
                loss, metrics = algorithm_loss(logp, batch, normalisers=normalisers, **kwargs)
            else:
                # A loss that normalises each micro-batch on its own: weighted by its share of the rows.
                loss, metrics = algorithm_loss(logp, batch, **kwargs)
                share = normalisers.share
                loss = loss * share
                metrics = {k: v if k.endswith("_max") else v * share for k, v in metrics.items()}
            mask = rows["completion_mask"].astype(jnp.float32)
            # The sampled distribution's entropy per completion token (a diagnostic; the
            # algorithm's entropy_coef, when set, is what puts it in the gradient).
            metrics = {**metrics, "entropy": jax.lax.stop_gradient((entropy * mask).sum() / normalisers.tokens)}
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        acc_grads, acc_loss = acc
        acc = (jax.tree_util.tree_map(jnp.add, acc_grads, grads), acc_loss + loss)
        return jax.lax.with_sharding_constraint(acc, self._acc_shardings), metrics

    def _update_fn(self, params, opt_state, frozen, rows, normalisers):
        """:meth:`_accumulate_fn` from zero then :meth:`_apply_fn`, fused: the
        update of a mini-batch that is one micro-batch.  Returns the new
        parameters and optimizer state, the gradient norm, whether the update
        was skipped, the loss and the micro-batch's metrics."""
        zeros = (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
        acc, metrics = self._accumulate_fn(zeros, params, frozen, rows, normalisers)
        return (*self._apply_fn(params, opt_state, acc), metrics)

    def _apply_fn(self, params, opt_state, acc):
        """One optimizer update with the accumulated gradients; skipped (state
        unchanged) when the loss or the gradient is not finite, so one bad
        batch cannot poison the policy."""
        grads, loss = acc
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(gnorm) & jnp.isfinite(loss)
        updates, new_opt = self.optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
        return keep(new_params, params), keep(new_opt, opt_state), gnorm, ~ok, loss

    # -- stage protocol --------------------------------------------------------------

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        self.items.append(batch)
        return batch

    def subscribe(self, callback: Callable[[Any, int], None]) -> None:
        """``callback(params, version)`` is called with every published policy."""
        self.subscribers.append(callback)

    def _rows(self) -> dict[str, np.ndarray]:
        """The global batch as flat rows ``[prompts * generations, ...]`` (host),
        with the algorithm's advantages."""
        grouped = group_items(self.items, self.pad_id)
        self._reward_mean = float(grouped["rewards"].mean())
        self._group = grouped["completion"].shape[1]
        estimate = self.algorithm.estimate(
            jnp.asarray(grouped["rewards"]), jnp.asarray(grouped["completion_mask"]),
            None if "values" not in grouped else jnp.asarray(grouped["values"]),
            logprobs=jnp.asarray(grouped["rollout_logprobs"]),
            ref_logprobs=None if "ref_logprobs" not in grouped else jnp.asarray(grouped["ref_logprobs"]))
        # Dynamic sampling (DAPO): groups whose rewards are all equal carry no signal and leave the
        # loss — their loss mask is zeroed, so shapes (and compiled programs) stay the same.
        keep_groups = getattr(self.algorithm, "keep_groups", None)
        keep = np.ones(grouped["rewards"].shape[0], bool) if keep_groups is None else \
            np.asarray(keep_groups(grouped["rewards"], grouped["completion_mask"]), bool)
        self._kept_groups = float(keep.mean()) if keep.size else 1.0
        if not keep.all():
            grouped = {**grouped, "completion_mask": grouped["completion_mask"] * keep[:, None, None].astype(grouped["completion_mask"].dtype)}
        rows = flat_rows(grouped)
        rows["advantages"] = np.asarray(estimate.advantages, np.float32).reshape(rows["completion"].shape)
        return rows

    def on_barrier(self, *, context: StageContext) -> None:
        if not distributed.owns(self.mesh):
            # A multi-process run whose trainer is on other processes' devices:
            # they train; this process only advances the version and takes part
            # in the weight sync (a transfer every process joins).
            self.items = []
            self.version += 1
            with context.span("weight_sync", policy_version=self.version, bytes=self.sync_bytes):
                for publish in self.subscribers:
                    publish(self.params, self.version)
            return
        start = time.perf_counter()
        rows = self._rows()
        self.items = []
        n_rows = len(rows["prompt"])
        mb = self.config.micro_batch_size
        mini = self.config.mini_batch_size or n_rows
        if n_rows % mb or mini % mb or n_rows % mini:
            raise ValueError(f"global batch of {n_rows} rows must split into mini-batches of {mini} rows and "
                             f"micro-batches of {mb} rows (roles.trainer.mini_batch_size / micro_batch_size)")
        versions = rows.pop("policy_version")
        rows.pop("values", None)  # the critic's business; advantages already hold them
        device_rows = {k: v for k, v in rows.items()}

        # Whole groups per micro-batch, the same number on each row shard: the prompts go once per group.
        g, shards = self._group, row_shards(self.row_sharding)
        per = prompts_shared_by(g, mb, shards, enabled=self.share_prompts)

        def chunk(lo, hi):
            part = {k: v[lo:hi:per] if k in ("prompt", "prompt_mask") else v[lo:hi] for k, v in device_rows.items()}
            return distributed.put(part, self.row_sharding)

        # One update per global batch: the weights that would compute the old log-probs are the
        # ones that use every row, so the training forward supplies them (module docstring).
        skip_old = self.fuse_old_logprobs and self.config.num_iterations == 1 and mini == n_rows
        with on_devices(self.mesh, context):  # colocated roles run device programs one at a time
            if not skip_old:
                # The "old" policy: current weights before any update of this global batch.
                with context.span("logprobs", policy_version=self.version):
                    old = [self._logprobs(self.params, self.frozen, chunk(i, i + mb)) for i in range(0, n_rows, mb)]
                    device_rows["old_logprobs"] = np.concatenate(distributed.to_host(old))
            # Each mini-batch's loss normalisers, counted before it is split (the same every pass).
            replicated = NamedSharding(self.mesh, PartitionSpec())
            normalisers = [distributed.put(_normalisers(device_rows["completion_mask"][lo:lo + mini], mb / mini), replicated)
                           for lo in range(0, n_rows, mini)]
            per_update: list[tuple[list, Any]] = []  # (micro-batch metrics, loss) of each update
            grad_norms, skips = [], []
            with context.span("train", policy_version=self.version, old_logprobs="fused" if skip_old else "pass",
                              prompts_shared_by=per):
                for _ in range(self.config.num_iterations):
                    for j, lo in enumerate(range(0, n_rows, mini)):
                        if mini == mb:  # one micro-batch per update: one program
                            self.params, self.opt_state, gnorm, skipped, loss, metrics = self._update(
                                self.params, self.opt_state, self.frozen, chunk(lo, lo + mb), normalisers[j])
                            parts = [metrics]
                        else:
                            acc, parts = self._zeros(self.params), []
                            for i in range(lo, lo + mini, mb):
                                acc, metrics = self._accumulate(acc, self.params, self.frozen, chunk(i, i + mb),
                                                                normalisers[j])
                                parts.append(metrics)
                            self.params, self.opt_state, gnorm, skipped, loss = self._apply(self.params, self.opt_state, acc)
                        grad_norms.append(gnorm)
                        skips.append(skipped)
                        per_update.append((parts, loss))
                fetched = distributed.to_host((per_update, grad_norms, skips))  # inside: the span covers the device work
            finite = [x for x in fetched[1] if np.isfinite(x)]
            metrics_acc: dict[str, list] = {}
            for parts, loss in fetched[0]:
                for k, v in {**_combine(parts), "loss": loss}.items():
                    metrics_acc.setdefault(k, []).append(v)
            self.last_metrics = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                                 for k, v in metrics_acc.items()}
            self.last_metrics["grad_norm"] = float(np.mean(finite)) if finite else float("nan")
            self.skipped_updates += int(np.sum(fetched[2]))
            self.last_metrics["skipped_updates"] = self.skipped_updates
            self.last_metrics["reward/mean"] = self._reward_mean
            self.last_metrics["old_logprobs_skipped"] = float(skip_old)
            if getattr(getattr(self.algorithm, "config", None), "dynamic_sampling", False):
                self.last_metrics["dynamic_sampling/kept_groups"] = self._kept_groups
            tokens = float(rows["completion_mask"].sum())
            self.last_metrics["tokens_per_s"] = tokens * self.config.num_iterations / max(time.perf_counter() - start, 1e-9)
            self.last_metrics["staleness_mean"] = float(np.mean(self.version - versions))
            self.last_metrics["staleness_max"] = float(np.max(self.version - versions))
            if self.skipped_updates > self.config.max_skipped_updates:
                raise NonFiniteLossError(
                    f"{self.skipped_updates} updates were skipped because the loss or gradient was not finite "
                    f"(more than roles.trainer.max_skipped_updates = {self.config.max_skipped_updates}); "
                    "lower the learning rate or check the rewards")
        self.version += 1
        # Outside on_devices: a weight sync to another process's devices waits
        # for its turn (rlpipe.runtime.distributed.RegionOrder), never holding devices.
        with context.span("weight_sync", policy_version=self.version, bytes=self.sync_bytes):
            for publish in self.subscribers:
                publish(self.params, self.version)

    @property
    def sync_bytes(self) -> int:
        """Bytes a weight sync publishes: the trainable parameters (with LoRA,
        the adapters alone), all shards together, before any cast."""
        return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.params))

    def state(self) -> Any:
        return {**super().state(), "version": self.version, "skipped_updates": self.skipped_updates}

    def restore(self, state: Any) -> None:
        super().restore(state)
        self.version = int(state["version"])
        self.skipped_updates = int(state["skipped_updates"])

    def publish(self) -> None:
        """Sends the current policy to every subscriber (after a restore)."""
        for callback in self.subscribers:
            callback(self.params, self.version)
