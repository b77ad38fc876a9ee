"""The trainer stage: policy-gradient updates at the global-batch barrier.

Items arriving during a global batch are kept (they are small host arrays);
at the barrier the trainer

1. computes advantages with its algorithm (per group of completions);
2. recomputes the current policy's log-probs of every completion (the "old"
   log-probs the PPO ratio is taken against; the rollout's own log-probs are
   kept for truncated importance sampling of stale rollouts);
3. for ``num_iterations`` passes, splits the rows into mini-batches, and for
   each accumulates gradients over micro-batches and applies one optax update;
4. publishes the new weights (policy version + 1) to its subscribers — the
   rollout's ``load_weights``.

Every device computation is a jitted pure function of (params, optimizer
state, arrays): ``nnx.split`` / ``nnx.merge`` happen inside the jit
boundary, the optimizer state is donated to the update.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlpipe import distributed
from rlpipe.core import weights
from rlpipe.core.devices import on_devices
from rlpipe.core.placement import RolePlacement, make_mesh
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.models.decoder import sequence_logprobs
from rlpipe.models.loading import load_model, load_tokenizer
from rlpipe.models.sampling import bucket_length, left_pad
from rlpipe.models.sharding import shardings_for
from rlpipe.roles.rollout import sampling_temperature


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


class _OptimizedState:
    """Parameters and optimizer state that move to host memory between uses."""

    params: Any
    opt_state: Any
    _on_device: bool = True

    def _build_model(self, config: Any, placement: RolePlacement, context: BuildContext, algorithm: Any) -> Any:
        """The common start of a trainable role's constructor: its config,
        algorithm, mesh and pad id; returns its model (initialised or loaded
        on the mesh)."""
        self.config = config
        self.algorithm = algorithm
        self.mesh = make_mesh(placement)
        self.pad_id = load_tokenizer(context.run_config.model).pad_id
        return load_model(context.run_config.model, mesh=self.mesh, seed=context.seed)

    def offload(self) -> None:
        if self._on_device:
            self.params, self.opt_state = weights.offload((self.params, self.opt_state))
            self._on_device = False

    def onload(self) -> None:
        if not self._on_device:
            self.params, self.opt_state = weights.onload((self.params, self.opt_state))
            self._on_device = True

    def state(self) -> Any:
        """Parameters and optimizer state as copies in host memory: later
        updates donate the device buffers, the snapshot stays valid."""
        return {"params": weights.offload(self.params), "opt_state": weights.offload(self.opt_state)}

    def restore(self, state: Any) -> None:
        """Installs ``state`` (host or device arrays) on this stage's shardings."""
        self.params, self.opt_state = weights.place_like((state["params"], state["opt_state"]),
                                                         (self.params, self.opt_state))


class NonFiniteLossError(RuntimeError):
    """Too many updates had a non-finite loss or gradient."""


class TrainerStage(_OptimizedState):
    """The policy update.  See the module docstring for what happens when."""

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext, algorithm: Any):
        run = context.run_config
        self.graphdef, params = nnx.split(self._build_model(config, placement, context, algorithm))
        self.shardings = shardings_for(params, self.mesh)
        self.temperature = sampling_temperature(run)
        self._entropy_bonus = getattr(getattr(algorithm, "config", None), "entropy_coef", 0.0) > 0
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
        self._grad = jax.jit(self._grad_fn)
        # The optimizer state is donated; parameters are not, because a rollout on
        # the same mesh and dtype shares the published buffers (zero-copy sync).
        self._apply = jax.jit(self._apply_fn, donate_argnums=(1,))
        self._logprobs = jax.jit(self._logprobs_fn)
        if placement.offload:
            self.offload()

    # -- pure functions under jit ----------------------------------------------------

    def _policy_logprobs(self, params, rows):
        # Sampling used logits / T; the ratio must compare the same distribution.
        lp = sequence_logprobs(nnx.merge(self.graphdef, params), rows["prompt"], rows["prompt_mask"],
                               rows["completion"], attention_mask(rows), self.temperature)
        return jnp.where(rows["completion_mask"].astype(bool), lp, 0.0)  # environment tokens are not scored

    def _logprobs_fn(self, params, rows):
        return self._policy_logprobs(params, rows)

    def _grad_fn(self, params, rows, scale):
        def loss_fn(p):
            logp, entropy = sequence_logprobs(nnx.merge(self.graphdef, p), rows["prompt"], rows["prompt_mask"],
                                              rows["completion"], attention_mask(rows), self.temperature,
                                              with_entropy=True)
            logp = jnp.where(rows["completion_mask"].astype(bool), logp, 0.0)  # environment tokens are not scored
            # The entropy goes in only for an entropy bonus, so an algorithm whose loss takes
            # (logp, rows) alone keeps working.
            loss, metrics = self.algorithm.loss(logp, rows, **({"entropy": entropy} if self._entropy_bonus else {}))
            mask = rows["completion_mask"].astype(jnp.float32)
            # The sampled distribution's entropy per completion token (a diagnostic; the
            # algorithm's entropy_coef, when set, is what puts it in the gradient).
            metrics = {**metrics, "entropy": jax.lax.stop_gradient((entropy * mask).sum() / jnp.maximum(mask.sum(), 1.0))}
            return loss * scale, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, loss, metrics

    def _apply_fn(self, params, opt_state, grads, loss):
        """One optimizer update; skipped (state unchanged) when the loss or the
        gradient is not finite, so one bad batch cannot poison the policy."""
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(gnorm) & jnp.isfinite(loss)
        updates, new_opt = self.optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        return keep(new_params, params), keep(new_opt, opt_state), gnorm, ~ok

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
            with context.span("weight_sync", policy_version=self.version):
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

        def chunk(lo, hi):
            return distributed.put({k: v[lo:hi] for k, v in device_rows.items()}, self.row_sharding)

        with on_devices(self.mesh, context):  # colocated roles run device programs one at a time
            # The "old" policy: current weights before any update of this global batch.
            with context.span("logprobs", policy_version=self.version):
                old = [self._logprobs(self.params, chunk(i, i + mb)) for i in range(0, n_rows, mb)]
                device_rows["old_logprobs"] = np.concatenate(distributed.to_host(old))
            metrics_acc: dict[str, list] = {}
            grad_norms, skips = [], []
            with context.span("train", policy_version=self.version):
                for _ in range(self.config.num_iterations):
                    for lo in range(0, n_rows, mini):
                        grads, parts, total = None, [], 0.0
                        for i in range(lo, lo + mini, mb):
                            g, loss, metrics = self._grad(self.params, chunk(i, i + mb), jnp.float32(mb / mini))
                            grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
                            total = total + loss
                            parts.append((loss, metrics))
                        self.params, self.opt_state, gnorm, skipped = self._apply(self.params, self.opt_state, grads, total)
                        grad_norms.append(gnorm)
                        skips.append(skipped)
                        for loss, metrics in parts:
                            metrics_acc.setdefault("loss", []).append(loss * (mini / mb))
                            for k, v in metrics.items():
                                metrics_acc.setdefault(k, []).append(v)
                fetched = distributed.to_host((metrics_acc, grad_norms, skips))  # inside: the span covers the device work
            finite = [x for x in fetched[1] if np.isfinite(x)]
            self.last_metrics = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                                 for k, v in fetched[0].items()}
            self.last_metrics["grad_norm"] = float(np.mean(finite)) if finite else float("nan")
            self.skipped_updates += int(np.sum(fetched[2]))
            self.last_metrics["skipped_updates"] = self.skipped_updates
            self.last_metrics["reward/mean"] = self._reward_mean
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
        # for its turn (rlpipe.distributed.RegionOrder), never holding devices.
        with context.span("weight_sync", policy_version=self.version):
            for publish in self.subscribers:
                publish(self.params, self.version)

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



class ValueModel(nnx.Module):
    """The critic: the policy's decoder trunk plus a scalar head."""

    def __init__(self, trunk: Any, *, seed: int):
        from rlpipe.models.decoder import Linear

        self.trunk = trunk
        # Starts at 0 so early value estimates do not swamp the returns.
        self.value_head = Linear(trunk.config.hidden_size, 1, bias=True, param_dtype=trunk.dtype, rngs=nnx.Rngs(params=seed))
        self.value_head.kernel[...] = jnp.zeros_like(self.value_head.kernel[...])

    def values(self, prompt, prompt_mask, completion, completion_mask, completion_attention=None):
        """``[rows, completion_len]``: the value of the state before each completion
        token (0 where ``completion_mask`` is 0); the forward pass attends to
        ``completion_attention`` (default: ``completion_mask``)."""
        tokens = jnp.concatenate([prompt, completion], axis=1)
        attend = completion_mask if completion_attention is None else completion_attention
        mask = jnp.concatenate([prompt_mask, attend], axis=1).astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        h, _ = self.trunk.hidden(tokens, positions, mask)
        p = prompt.shape[1]
        v = self.value_head(h[:, p - 1:-1])[..., 0].astype(jnp.float32)
        return jnp.where(completion_mask.astype(bool), v, 0.0)


def clipped_value_loss(values, old_values, returns, mask, clip: float):
    """PPO's clipped value loss: ``0.5 * max((v - R)^2, (clip(v) - R)^2)``,
    token-mean over valid tokens."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    per_token = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    m = mask.astype(jnp.float32)
    return jnp.sum(per_token * m) / jnp.maximum(m.sum(), 1.0)


class CriticStage(_OptimizedState):
    """Values for every completion token as items pass; at the barrier, trains
    on the algorithm's returns (GAE) with the clipped value loss."""

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
        self._grad = jax.jit(self._grad_fn)
        self._apply = jax.jit(self._apply_fn, donate_argnums=(0, 1))
        if placement.offload:
            self.offload()

    def _grad_fn(self, params, rows, scale):
        def loss_fn(p):
            v = nnx.merge(self.graphdef, p).values(rows["prompt"], rows["prompt_mask"], rows["completion"], rows["completion_mask"],
                                                   attention_mask(rows))
            return clipped_value_loss(v, rows["values"], rows["returns"], rows["completion_mask"], self.config.value_clip) * scale

        return jax.value_and_grad(loss_fn)(params)

    def _apply_fn(self, params, opt_state, grads):
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def _micro_batches(self, rows: dict[str, np.ndarray]):
        mb = self.config.micro_batch_size
        n = len(rows["prompt"])
        padded = -(-n // mb) * mb
        if padded != n:  # zero rows (mask 0) so every call has one shape
            rows = {k: np.concatenate([v, np.zeros((padded - n, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}
        for lo in range(0, padded, mb):
            yield distributed.put({k: v[lo:lo + mb] for k, v in rows.items()}, self.replicated)

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        grouped = group_items([batch], self.pad_id)
        rows = flat_rows(grouped)
        keys = ("prompt", "prompt_mask", "completion", "completion_mask", *(["completion_attention_mask"] if "completion_attention_mask" in rows else []))
        p, g, n = grouped["completion"].shape

        def compute() -> dict[str, np.ndarray]:
            with on_devices(self.mesh, context):
                outs = [self._values(self.params, *(c[k] for k in keys)) for c in self._micro_batches({k: rows[k] for k in keys})]
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
        rows = flat_rows(grouped)
        rows = {k: rows[k] for k in ("prompt", "prompt_mask", "completion", "completion_mask", "completion_attention_mask", "values")
                if k in rows}
        rows["returns"] = np.asarray(estimate.returns, np.float32).reshape(rows["completion"].shape)
        n_chunks = -(-len(rows["prompt"]) // self.config.micro_batch_size)
        grads, losses = None, []
        with on_devices(self.mesh, context):
            for chunk in self._micro_batches(rows):
                loss, g = self._grad(self.params, chunk, jnp.float32(1.0 / n_chunks))
                grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
                losses.append(loss)
            self.params, self.opt_state = self._apply(self.params, self.opt_state, grads)
            self.last_metrics = {"value_loss": float(np.sum(distributed.to_host(losses)))}

