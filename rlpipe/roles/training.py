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

from rlpipe.core import weights
from rlpipe.core.placement import RolePlacement, make_mesh
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.models.decoder import sequence_logprobs
from rlpipe.models.loading import load_model, load_tokenizer
from rlpipe.models.sampling import bucket_length, left_pad
from rlpipe.models.sharding import shardings_for


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


class TrainerStage:
    """The policy update.  See the module docstring for what happens when."""

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext, algorithm: Any):
        run = context.run_config
        self.config = config
        self.algorithm = algorithm
        self.mesh = make_mesh(placement)
        self.pad_id = load_tokenizer(run.model).pad_id
        model = load_model(run.model, mesh=self.mesh, seed=context.seed)
        self.graphdef, params = nnx.split(model)
        self.shardings = shardings_for(params, self.mesh)
        rollout = run.roles.get("rollout")
        self.temperature = float(getattr(rollout, "temperature", 1.0) or 1.0)
        self.optimizer = make_optimizer(config, run.train.steps * config.num_iterations)
        self.params = params
        # Moments follow their parameters' shardings; scalars (step counts) are
        # replicated on the mesh, committed, so offload/onload keeps them there.
        replicated = NamedSharding(self.mesh, PartitionSpec())
        mesh_devices = set(self.mesh.devices.flat)
        self.opt_state = jax.tree_util.tree_map(
            lambda x: x if set(x.sharding.device_set) == mesh_devices else jax.device_put(x, replicated),
            jax.jit(self.optimizer.init)(params))
        self.version = 0
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
        self._on_device = True
        if placement.offload:
            self.offload()

    # -- pure functions under jit ----------------------------------------------------

    def _policy_logprobs(self, params, rows):
        # Sampling used logits / T; the ratio must compare the same distribution.
        return sequence_logprobs(nnx.merge(self.graphdef, params), rows["prompt"], rows["prompt_mask"],
                                 rows["completion"], rows["completion_mask"], self.temperature)

    def _logprobs_fn(self, params, rows):
        return self._policy_logprobs(params, rows)

    def _grad_fn(self, params, rows, scale):
        def loss_fn(p):
            logp = self._policy_logprobs(p, rows)
            loss, metrics = self.algorithm.loss(logp, rows)
            return loss * scale, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, loss, metrics

    def _apply_fn(self, params, opt_state, grads):
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)

    # -- stage protocol --------------------------------------------------------------

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        self.items.append(batch)
        return batch

    def subscribe(self, callback: Callable[[Any, int], None]) -> None:
        """``callback(params, version)`` is called with every published policy."""
        self.subscribers.append(callback)

    def _rows(self) -> dict[str, np.ndarray]:
        """The global batch as flat rows ``[prompts * generations, ...]`` (host)."""
        prompts, pmasks, comps, cmasks, rewards, rollout_lp, refs, versions = [], [], [], [], [], [], [], []
        plen = bucket_length(max(int(np.asarray(b["prompt_mask"]).sum(axis=1).max(initial=1)) for b in self.items))
        for b in self.items:
            comp = np.asarray(b["completion_tokens"])
            p, g, n = comp.shape
            toks, mask = left_pad(b["prompt_tokens"], b["prompt_mask"], plen, self.pad_id)
            prompts.append(np.repeat(toks, g, 0))
            pmasks.append(np.repeat(mask, g, 0))
            comps.append(comp.reshape(p * g, n))
            cmask = np.asarray(b["completion_mask"]).astype(np.float32)
            cmasks.append(cmask)
            rewards.append(np.asarray(b["rewards"], np.float32).reshape(p, g))
            rollout_lp.append(np.asarray(b["rollout_logprobs"], np.float32).reshape(p * g, n))
            if "ref_logprobs" in b:
                refs.append(np.asarray(b["ref_logprobs"], np.float32).reshape(p * g, n))
            versions.append(np.repeat(np.asarray(b["policy_version"]), g))
        cmask_grouped = np.concatenate(cmasks)
        self._reward_mean = float(np.concatenate(rewards).mean())
        advantages = np.asarray(self.algorithm.advantages(jnp.asarray(np.concatenate(rewards)), jnp.asarray(cmask_grouped)))
        rows = {
            "prompt": np.concatenate(prompts), "prompt_mask": np.concatenate(pmasks),
            "completion": np.concatenate(comps), "completion_mask": cmask_grouped.reshape(-1, cmask_grouped.shape[-1]),
            "advantages": advantages.reshape(-1, advantages.shape[-1]).astype(np.float32),
            "rollout_logprobs": np.concatenate(rollout_lp), "policy_version": np.concatenate(versions),
        }
        if refs:
            rows["ref_logprobs"] = np.concatenate(refs)
        return rows

    def on_barrier(self, *, context: StageContext) -> None:
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
        device_rows = {k: v for k, v in rows.items()}

        def chunk(lo, hi):
            return jax.device_put({k: v[lo:hi] for k, v in device_rows.items()}, self.row_sharding)

        # The "old" policy: current weights before any update of this global batch.
        old = [self._logprobs(self.params, chunk(i, i + mb)) for i in range(0, n_rows, mb)]
        device_rows["old_logprobs"] = np.concatenate(jax.device_get(old))
        metrics_acc: dict[str, list] = {}
        grad_norms = []
        for _ in range(self.config.num_iterations):
            for lo in range(0, n_rows, mini):
                grads, parts = None, []
                for i in range(lo, lo + mini, mb):
                    g, loss, metrics = self._grad(self.params, chunk(i, i + mb), jnp.float32(mb / mini))
                    grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
                    parts.append((loss, metrics))
                self.params, self.opt_state, gnorm = self._apply(self.params, self.opt_state, grads)
                grad_norms.append(gnorm)
                for loss, metrics in parts:
                    metrics_acc.setdefault("loss", []).append(loss * (mini / mb))
                    for k, v in metrics.items():
                        metrics_acc.setdefault(k, []).append(v)
        fetched = jax.device_get((metrics_acc, grad_norms))
        self.last_metrics = {k: float(np.mean(v)) for k, v in fetched[0].items()}
        self.last_metrics["grad_norm"] = float(np.mean(fetched[1]))
        self.last_metrics["reward/mean"] = self._reward_mean
        tokens = float(rows["completion_mask"].sum())
        self.last_metrics["tokens_per_s"] = tokens * self.config.num_iterations / max(time.perf_counter() - start, 1e-9)
        self.last_metrics["staleness_mean"] = float(np.mean(self.version - versions))
        self.last_metrics["staleness_max"] = float(np.max(self.version - versions))
        self.version += 1
        for publish in self.subscribers:
            publish(self.params, self.version)

    def offload(self) -> None:
        if self._on_device:
            self.params, self.opt_state = weights.offload((self.params, self.opt_state))
            self._on_device = False

    def onload(self) -> None:
        if not self._on_device:
            self.params, self.opt_state = weights.onload((self.params, self.opt_state))
            self._on_device = True

    def state(self) -> Any:
        return {"params": self.params, "opt_state": self.opt_state, "version": self.version}

    def restore(self, state: Any) -> None:
        self.params, self.opt_state, self.version = state["params"], state["opt_state"], int(state["version"])

