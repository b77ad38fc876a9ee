"""The reward-model stage: a scalar score per completion under a learned reward model."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlpipe.core.errors import ConfigError, Problem
from rlpipe.core.placement import RolePlacement, make_mesh
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.models.generation import bucket_length, left_pad, row_shards
from rlpipe.models.hf import from_pretrained_classifier
from rlpipe.models.loading import compute_dtype, load_tokenizer
from rlpipe.roles.model_holder import ModelHolder
from rlpipe.runtime import distributed, weights
from rlpipe.runtime.devices import on_devices


def sequence_scores(model: Any, head: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """``[rows]`` float32: ``hidden[last real token] @ head`` of each row, where
    ``mask`` marks the real tokens (any padding, gaps included: positions count
    only real tokens, and attention reads only them) — the score transformers'
    ``*ForSequenceClassification`` gives the row's real tokens alone."""
    mask = mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    h, _ = model.hidden(tokens, positions, mask)
    last = tokens.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return jnp.einsum("bh,ho->bo", h_last.astype(jnp.float32), head.astype(jnp.float32))[:, 0]


def _score_fn(graphdef):
    def fn(state, head, tokens, mask):
        return sequence_scores(nnx.merge(graphdef, state), head, tokens, mask)

    return jax.jit(fn)


class RewardModelStage:
    """Scores ``prompt + completion`` of every completion with the reward model of
    ``roles.reward_model.checkpoint``.  Micro-batched over rows like the
    reference (each micro-batch split by rows over the mesh's ``fsdp`` axis,
    padded to whole micro-batches: one compiled program)."""

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext):
        run = context.run_config
        self.config = config
        mesh = make_mesh(placement)
        model, head = from_pretrained_classifier(config.checkpoint, mesh=mesh, dtype=compute_dtype(run.model, mesh))
        tokenizer = load_tokenizer(run.model)
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ConfigError(Problem("roles.reward_model.checkpoint",
                                      f"the reward model's vocabulary ({model.config.vocab_size}) is smaller than the "
                                      f"policy tokenizer's ({tokenizer.vocab_size}): it must score the policy's tokens"))
        self.holder = ModelHolder(model, placement, mesh)
        self.head = distributed.put(head, self.holder.replicated)
        self.pad_id = tokenizer.pad_id
        self._fn = _score_fn(self.holder.graphdef)
        if placement.offload:
            self.offload()

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        prompts, pmask = np.asarray(batch["prompt_tokens"]), np.asarray(batch["prompt_mask"])
        comp = np.asarray(batch["completion_tokens"])
        # Agentic episodes: the environment's tokens are part of what is judged.
        cmask = np.asarray(batch.get("completion_attention_mask", batch["completion_mask"]))
        rows, g, n = comp.shape
        length = bucket_length(int(pmask.sum(axis=1).max(initial=1)))
        prompts, pmask = left_pad(prompts, pmask, length, self.pad_id)
        tokens = np.concatenate([np.repeat(prompts, g, axis=0), comp.reshape(rows * g, n)], axis=1).astype(np.int32)
        mask = np.concatenate([np.repeat(pmask, g, axis=0), cmask.reshape(rows * g, n).astype(bool)], axis=1)
        state, head = self.holder.state, self.head
        shards = row_shards(self.holder.rows)
        mb = -(-self.config.micro_batch_size // shards) * shards  # whole rows per device
        total = rows * g
        padded = -(-total // mb) * mb
        if padded != total:  # pad to whole micro-batches: every call has one shape (one compile)
            tokens, mask = (np.concatenate([a, np.zeros((padded - total, *a.shape[1:]), a.dtype)]) for a in (tokens, mask))

        def score() -> dict[str, np.ndarray]:
            with on_devices(self.holder.mesh, context):
                outs = [self._fn(state, head, *distributed.put([tokens[s:s + mb], mask[s:s + mb]], self.holder.rows))
                        for s in range(0, padded, mb)]
                return {"scores": np.concatenate(distributed.to_host(outs))[:total]}

        with context.span("score"):
            # Multi-process runs: processes without the role's devices receive its scores.
            scores = distributed.share(self.holder.mesh, score)["scores"]
        return batch.add(reward_model_scores=scores.reshape(rows, g).astype(np.float32))

    def offload(self) -> None:
        self.holder.offload()
        self.head = weights.offload(self.head)

    def onload(self) -> None:
        self.holder.onload()
        self.head = weights.onload(self.head)
