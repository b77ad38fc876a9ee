"""The reference stage: per-token log-probs of the completions under a frozen policy."""

from __future__ import annotations

from typing import Any

import attrs
import jax
import numpy as np
from flax import nnx

from rlpipe.core.placement import RolePlacement, make_mesh
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.models.decoder import sequence_logprobs
from rlpipe.models.generation import bucket_length, left_pad, row_shards
from rlpipe.models.loading import load_model, load_tokenizer
from rlpipe.roles.model_holder import ModelHolder, shared_base
from rlpipe.roles.optimization import prompts_shared_by
from rlpipe.roles.rollout import sampling_temperature
from rlpipe.runtime import distributed
from rlpipe.runtime.devices import on_devices


def _logprobs_fn(graphdef, temperature: float):
    def fn(state, prompt, prompt_mask, completion, completion_mask):
        return sequence_logprobs(nnx.merge(graphdef, state), prompt, prompt_mask, completion, completion_mask, temperature)

    return jax.jit(fn)


class ReferenceStage:
    """Per-token log-probs of the completions under a frozen policy: the initial
    policy, or ``roles.reference.checkpoint``.  Micro-batched over rows; each
    micro-batch is split by rows over the mesh's ``fsdp`` axis (rounded up to
    a multiple of its size, the padding rows dropped)."""

    #: Micro-batches of whole GRPO groups give each prompt once (``sequence_logprobs``'s
    #: shared prompts); ``False`` repeats it per completion (to compare the two).
    share_prompts: bool = True

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext):
        run = context.run_config
        self.config = config
        mesh = make_mesh(placement)
        model_config = run.model
        #: With ``model.lora`` and no checkpoint, the reference is the base model (the
        #: adapters off): the run's base weights on this mesh, shared with the policy roles
        #: on the same devices instead of a copy; on other devices, loaded as without LoRA.
        self.shared = None
        if config.checkpoint:
            model_config = attrs.evolve(model_config, path=config.checkpoint, lora=None)
        if getattr(model_config, "lora", None) is not None:
            self.shared = shared_base(run, mesh, seed=context.seed)
            model = self.shared.model()
        else:
            model = load_model(model_config, mesh=mesh, seed=context.seed)
        self.holder = ModelHolder(model, placement, mesh, shared=self.shared)
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
        comp, cmask = comp.reshape(rows * g, n), cmask.reshape(rows * g, n)
        state = self.holder.state
        shards = row_shards(self.holder.rows)
        mb = -(-self.config.micro_batch_size // shards) * shards  # whole rows per device
        # Whole groups per micro-batch, the same number per device: each prompt goes once
        # (sequence_logprobs's shared prompts); otherwise once per completion.
        per = prompts_shared_by(g, mb, shards, enabled=self.share_prompts)
        if per == 1:
            prompts, pmask = np.repeat(prompts, g, axis=0), np.repeat(pmask, g, axis=0)
        total = rows * g
        padded = -(-total // mb) * mb
        if padded != total:  # pad to whole micro-batches: every call has one shape (one compile)
            pad = lambda a, n: np.concatenate([a, np.zeros((n - len(a), *a.shape[1:]), a.dtype)])
            prompts, pmask = pad(prompts, padded // per), pad(pmask, padded // per)
            comp, cmask = pad(comp, padded), pad(cmask, padded)

        # Dispatch every micro-batch, then fetch once: no host round trip between them.
        def score() -> dict[str, np.ndarray]:
            with on_devices(self.holder.mesh, context):
                outs = [self._fn(state, *distributed.put([prompts[s // per:(s + mb) // per], pmask[s // per:(s + mb) // per],
                                                          comp[s:s + mb], cmask[s:s + mb]], self.holder.rows))
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
