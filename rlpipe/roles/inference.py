"""The stages of the inference roles: rollout (generation) and reference (scoring).

Both hold a decoder's parameters on their own placement's mesh, move them to
host memory and back when the plan offloads them, and run jitted programs on
that mesh.  Items carry completions grouped per prompt: ``completion_tokens``,
``completion_mask`` and the log-probs are ``[prompts, num_generations, tokens]``.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlpipe import distributed
from rlpipe.core import weights
from rlpipe.core.devices import on_devices
from rlpipe.core.placement import RolePlacement, make_mesh
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.models.decoder import Decoder, sequence_logprobs
from rlpipe.models.loading import load_model, load_tokenizer
from rlpipe.models.sampling import SamplingParams, bucket_length, left_pad
from rlpipe.models.sharding import shardings_for
from rlpipe.roles.rollout import sampling_temperature


class _ModelHolder:
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


class RolloutStage:
    """Generates ``num_generations`` completions per prompt.

    New weights arrive through :meth:`load_weights` (from the trainer, at its
    barrier).  Step ``s`` is generated with exactly policy version
    ``context.behavior_version`` (``s - lag``), whatever the thread timing, so
    asynchronous runs are reproducible; the stage keeps each published version
    until no upcoming step needs it (at most ``lag + 1`` versions).  A
    generation uses one version from start to end.
    """

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext):
        run = context.run_config
        self.config = config
        mesh = make_mesh(placement)
        self.tokenizer = load_tokenizer(run.model)
        model = load_model(run.model, mesh=mesh, seed=context.seed)
        self.holder = _ModelHolder(model, placement, mesh)
        spec = context.registry.get("rlpipe_rollout_engines", config.engine, path="roles.rollout.engine")
        self.engine = spec.factory(self.holder.graphdef, cache_dtype=model.dtype)
        stops = tuple(dict.fromkeys([t for t in (self.tokenizer.eos_id, *config.stop_tokens) if t is not None]))
        self.params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                     top_k=config.top_k, top_p=config.top_p, stop_tokens=stops,
                                     pad_id=self.tokenizer.pad_id)
        self._published = False  # no trainer publishes: generate with the initial weights
        if placement.offload:
            self.holder.offload()

    @property
    def policy_version(self) -> int:
        """The newest policy version held."""
        return self.holder.versions()[-1]

    def load_weights(self, state: Any, version: int) -> None:
        """Weight sync (DESIGN §4): shares, re-lays/casts in one jitted step, or
        reshards across meshes, depending on where ``state`` lives."""
        shared = weights._devices(state) & set(self.holder.mesh.devices.flat)  # noqa: SLF001
        # Re-laying out on shared devices runs a program with collectives there.
        with on_devices(self.holder.mesh) if shared else contextlib.nullcontext():
            self.holder.put(version, weights.sync(state, self.holder.shardings, dtype=self.holder.dtype))
        self._published = True

    def _weights_for(self, version: int) -> tuple[Any, int]:
        held = self.holder.versions()
        if version in held:
            return self.holder.version_state(version), version
        if not self._published:
            return self.holder.state, held[-1]
        # The executor emits step s only after version s - lag was published,
        # so this is a wiring bug (e.g. a resumed run without its pending rollouts).
        raise RuntimeError(f"this step must be generated with policy version {version}, "
                           f"but the rollout holds versions {held}")

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        state, version = self._weights_for(context.behavior_version)
        prompts = np.asarray(batch["prompt_tokens"])
        mask = np.asarray(batch["prompt_mask"])
        g = self.config.num_generations

        def generate() -> dict[str, np.ndarray]:
            with on_devices(self.holder.mesh, context):
                out = self.engine.generate(state, np.repeat(prompts, g, axis=0), np.repeat(mask, g, axis=0), context.key(),
                                           self.params, sharding=self.holder.replicated)
            return {"tokens": out.tokens, "mask": out.mask, "logprobs": out.logprobs}

        with context.span("generate", policy_version=version):
            # Multi-process runs: processes without the rollout's devices receive its completions.
            out = distributed.share(self.holder.mesh, generate)
        rows, n = prompts.shape[0], self.params.max_new_tokens
        return batch.add(
            completion_tokens=out["tokens"].reshape(rows, g, n),
            completion_mask=out["mask"].reshape(rows, g, n),
            rollout_logprobs=out["logprobs"].reshape(rows, g, n),
            policy_version=np.full((rows,), version, np.int32),
        )

    def offload(self) -> None:
        self.holder.offload()

    def onload(self) -> None:
        self.holder.onload()


def _logprobs_fn(graphdef, temperature: float):
    def fn(state, prompt, prompt_mask, completion, completion_mask):
        return sequence_logprobs(nnx.merge(graphdef, state), prompt, prompt_mask, completion, completion_mask, temperature)

    return jax.jit(fn)


class ReferenceStage:
    """Per-token log-probs of the completions under a frozen policy: the initial
    policy, or ``roles.reference.checkpoint``.  Micro-batched over rows."""

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext):
        run = context.run_config
        self.config = config
        mesh = make_mesh(placement)
        model_config = run.model
        if config.checkpoint:
            import attrs

            model_config = attrs.evolve(model_config, path=config.checkpoint)
        model = load_model(model_config, mesh=mesh, seed=context.seed)
        self.holder = _ModelHolder(model, placement, mesh)
        self.pad_id = load_tokenizer(run.model).pad_id
        # The same tempered distribution the rollout sampled from, so KL compares like with like.
        self._fn = _logprobs_fn(self.holder.graphdef, sampling_temperature(run))
        if placement.offload:
            self.holder.offload()

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        prompts, pmask = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"])
        comp = np.asarray(batch["completion_tokens"])
        loss_mask = np.asarray(batch["completion_mask"]).astype(bool)
        # Agentic episodes: environment tokens are context (attended) but not scored.
        cmask = np.asarray(batch.get("completion_attention_mask", batch["completion_mask"]))
        rows, g, n = comp.shape
        length = bucket_length(int(pmask.sum(axis=1).max(initial=1)))
        prompts, pmask = left_pad(prompts, pmask, length, self.pad_id)
        prompts, pmask = np.repeat(prompts, g, axis=0), np.repeat(pmask, g, axis=0)
        comp, cmask = comp.reshape(rows * g, n), cmask.reshape(rows * g, n)
        state = self.holder.state
        mb = self.config.micro_batch_size
        total = rows * g
        padded = -(-total // mb) * mb
        if padded != total:  # pad to whole micro-batches: every call has one shape (one compile)
            prompts, pmask, comp, cmask = (np.concatenate([a, np.zeros((padded - total, *a.shape[1:]), a.dtype)])
                                           for a in (prompts, pmask, comp, cmask))
        # Dispatch every micro-batch, then fetch once: no host round trip between them.
        def score() -> dict[str, np.ndarray]:
            with on_devices(self.holder.mesh, context):
                outs = [self._fn(state, *distributed.put([a[s:s + mb] for a in (prompts, pmask, comp, cmask)], self.holder.replicated))
                        for s in range(0, padded, mb)]
                return {"logprobs": np.concatenate(distributed.to_host(outs))[:total]}

        with context.span("logprobs"):
            # Multi-process runs: processes without the reference's devices receive its log-probs.
            logprobs = distributed.share(self.holder.mesh, score)["logprobs"]
        logprobs = np.where(loss_mask, logprobs.reshape(rows, g, n), 0.0)
        return batch.add(ref_logprobs=logprobs.astype(np.float32))

    def offload(self) -> None:
        self.holder.offload()

    def onload(self) -> None:
        self.holder.onload()

