"""The rollout stage: generates completions with the policy it holds.

It holds the policy on its own placement's mesh (:class:`ModelHolder`), by
policy version, and receives new versions through :meth:`RolloutStage.load_weights`
(weight sync).  *What* it generates with those weights is a
:class:`Generator` it is composed with: :class:`SingleTurn` (one completion
per row, the rollout engine's ``generate``) by default, or an episode runner
such as :class:`rlpipe.plugins.agentic.rollout.EpisodeGenerator` for agentic
rollouts.  Items carry completions grouped per prompt: the fields are
``[prompts, num_generations, tokens]``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rlpipe.core.errors import PromptTokenError
from rlpipe.core.placement import RolePlacement, make_mesh
from rlpipe.core.specs import BuildContext
from rlpipe.core.stage import Batch, StageContext
from rlpipe.models.generation import SamplingParams
from rlpipe.models.loading import load_tokenizer
from rlpipe.roles.model_holder import ModelHolder, policy_model
from rlpipe.runtime import distributed, weights
from rlpipe.runtime.devices import on_devices


@runtime_checkable
class Generator(Protocol):
    """What a rollout stage generates for one item, with the weights it chose.

    ``generate`` returns the fields to add to the item (at least
    ``completion_tokens``, ``completion_mask`` and ``rollout_logprobs``, each
    ``[prompts, num_generations, max_new_tokens]``); the stage adds
    ``policy_version``.  It must use ``state`` (policy version ``version``)
    for every token it samples.  A generator may also have
    ``on_barrier(*, context) -> dict[str, float]``: metrics of the step, logged
    as ``rollout/<name>``.
    """

    def generate(self, batch: Batch, state: Any, version: int, *, context: StageContext) -> Mapping[str, np.ndarray]: ...


class SingleTurn:
    """One completion per row: the rollout engine's ``generate`` over every
    prompt repeated ``num_generations`` times."""

    def __init__(self, stage: RolloutStage):
        self.stage = stage

    def generate(self, batch: Batch, state: Any, version: int, *, context: StageContext) -> dict[str, np.ndarray]:
        stage = self.stage
        prompts = np.asarray(batch["prompt_tokens"])
        mask = np.asarray(batch["prompt_mask"])
        g = stage.config.num_generations

        def generate() -> dict[str, np.ndarray]:
            rows = stage.config.refill_rows
            with on_devices(stage.holder.mesh, context):
                if rows is not None:  # continuous batching (checked at build: one row shard)
                    out = stage.engine.generate_refill(state, np.repeat(prompts, g, axis=0), np.repeat(mask, g, axis=0),
                                                       context.key(), stage.params, rows=rows)
                elif stage.engine_repeats:  # each prompt prefilled once for its g completions
                    out = stage.engine.generate(state, prompts, mask, context.key(), stage.params,
                                                sharding=stage.holder.rows, repeat=g)
                else:
                    out = stage.engine.generate(state, np.repeat(prompts, g, axis=0), np.repeat(mask, g, axis=0),
                                                context.key(), stage.params, sharding=stage.holder.rows)
            return {"tokens": out.tokens, "mask": out.mask, "logprobs": out.logprobs}

        with context.span("generate", policy_version=version):
            # Multi-process runs: processes without the rollout's devices receive its completions.
            out = distributed.share(stage.holder.mesh, generate)
        rows, n = prompts.shape[0], stage.params.max_new_tokens
        return {"completion_tokens": out["tokens"].reshape(rows, g, n),
                "completion_mask": out["mask"].reshape(rows, g, n),
                "rollout_logprobs": out["logprobs"].reshape(rows, g, n)}


def check_prompt_tokens(batch: Batch, vocab_size: int, *, tokenizer_vocab: int | None = None) -> None:
    """Raises when a prompt token of ``batch`` (where ``prompt_mask`` is set)
    is not an id of a ``vocab_size``-token vocabulary.

    Such an id has no embedding: the gather would give NaN hidden states and
    NaN log-probs, silently.  It comes from a tokenizer that does not match
    the model.

    Raises:
        PromptTokenError: names the first bad prompt (its ``example_id`` — its
            position in the task's stream — and its text when the item carries
            them), the id, its position in the prompt, the vocabulary size
            (and ``tokenizer_vocab``, the tokenizer's, when given), and how many
            more such tokens the item holds.
    """
    tokens = np.asarray(batch["prompt_tokens"])
    bad = np.asarray(batch["prompt_mask"]).astype(bool) & ((tokens < 0) | (tokens >= vocab_size))
    if not bad.any():
        return
    row, col = (int(i) for i in np.argwhere(bad)[0])
    which = f"prompt {row} of the item"
    if "example_id" in batch:
        which = f"example {int(np.asarray(batch['example_id'])[row])}"
    if "example" in batch:
        example = np.asarray(batch["example"], dtype=object)[row]
        text = example.get("prompt") if isinstance(example, dict) else None
        if isinstance(text, str):
            which += f" (prompt {text[:60]!r}{'...' if len(text) > 60 else ''})"
    position = int(np.asarray(batch["prompt_mask"])[row, :col].astype(bool).sum())  # among the prompt's own tokens
    more = int(bad.sum()) - 1
    tokenizer = f"; the tokenizer has {tokenizer_vocab} ids" if tokenizer_vocab is not None and tokenizer_vocab != vocab_size else ""
    raise PromptTokenError(
        f"{which}: token id {int(tokens[row, col])} at prompt position {position} is outside the model's vocabulary "
        f"of {vocab_size} ids (0..{vocab_size - 1}){tokenizer}"
        + (f"; {more} more such token(s) in this item" if more else "")
        + ": the tokenizer does not match the model (model.tokenizer)")


def _takes_repeat(engine: Any) -> bool:
    """Whether ``engine.generate`` accepts ``repeat=`` (a third-party engine need not)."""
    try:
        parameters = inspect.signature(engine.generate).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "repeat" in parameters  # by name only: a **kwargs engine might swallow it and return too few rows


def _check_refill(config: Any, engine: Any, rows: Any, generator: Any) -> None:
    """``roles.rollout.refill_rows`` needs single-turn rollouts, an engine with
    ``generate_refill`` and the rows on one device."""
    from rlpipe.core.errors import ConfigError, Problem
    from rlpipe.models.generation import row_shards

    why = None
    if generator is not SingleTurn:
        why = "agentic episodes already refill their rows turn by turn; leave it null with an environment"
    elif not callable(getattr(engine, "generate_refill", None)):
        why = f"the rollout engine {config.engine!r} has no generate_refill (continuous batching)"
    elif row_shards(rows) > 1:
        why = (f"the rollout's rows are split over {row_shards(rows)} devices (its mesh's fsdp axis); continuous "
               "batching runs the rows on one device: use a mesh with fsdp 1, or leave refill_rows null")
    if why:
        raise ConfigError(Problem("roles.rollout.refill_rows", why))


class RolloutStage:
    """Generates ``num_generations`` completions per prompt.

    New weights arrive through :meth:`load_weights` (from the trainer, at its
    barrier): the stage is a :class:`rlpipe.core.stage.WeightReceiver`, which
    is how the driver finds it, so a role that wraps or replaces it under
    another name receives them too.  Step ``s`` is generated with exactly policy version
    ``context.behavior_version`` (``s - lag``), whatever the thread timing, so
    asynchronous runs are reproducible; the stage keeps each published version
    until no upcoming step needs it (at most ``lag + 1`` versions).  A
    generation uses one version from start to end.
    """

    def __init__(self, config: Any, placement: RolePlacement, *, context: BuildContext,
                 generator: Callable[[RolloutStage], Generator] = SingleTurn):
        run = context.run_config
        self.config = config
        mesh = make_mesh(placement)
        self.tokenizer = load_tokenizer(run.model)
        # With model.lora: the run's base on this mesh (shared with the trainer and the
        # reference when they are on the same devices) plus the adapters the trainer starts from.
        model, base = policy_model(run, mesh, seed=context.seed)
        self.vocab_size = int(model.config.vocab_size)
        self.holder = ModelHolder(model, placement, mesh, shared=base)
        spec = context.registry.get("rlpipe_rollout_engines", config.engine, path="roles.rollout.engine")
        self.engine = spec.factory(self.holder.graphdef, cache_dtype=model.dtype)
        #: The engine's ``generate`` takes ``repeat`` (the built-in one does): each prompt is then
        #: prefilled once for its num_generations completions instead of once per completion.
        self.engine_repeats = _takes_repeat(self.engine)
        stops = tuple(dict.fromkeys([t for t in (self.tokenizer.eos_id, *config.stop_tokens) if t is not None]))
        self.params = SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                     top_k=config.top_k, top_p=config.top_p, stop_tokens=stops,
                                     pad_id=self.tokenizer.pad_id, ignore_eos=config.ignore_eos)
        if config.refill_rows is not None:
            _check_refill(config, self.engine, self.holder.rows, generator)
        self._published = False  # no trainer publishes: generate with the initial weights
        self.last_metrics: dict[str, float] = {}
        self.generator: Generator = generator(self)
        if placement.offload:
            self.holder.offload()

    @property
    def policy_version(self) -> int:
        """The newest policy version held."""
        return self.holder.versions()[-1]

    def load_weights(self, state: Any, version: int) -> None:
        """Weight sync (DESIGN §4): shares, re-lays/casts in one jitted step, or
        reshards across meshes, depending on where ``state`` lives.

        With ``model.lora`` ``state`` is the adapters alone (the base is held
        once and never moves); they keep their float32, as the trainer has them,
        and are applied unmerged by the forward."""
        shared = weights.devices_of(state) & set(self.holder.mesh.devices.flat)
        dtype = None if self.holder.adapters else self.holder.dtype
        # Re-laying out on shared devices runs a program with collectives there.
        with on_devices(self.holder.mesh) if shared else contextlib.nullcontext():
            self.holder.put(version, weights.sync(state, self.holder.shardings, dtype=dtype))
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
        # Before the engine: an id without an embedding would only show up as NaN log-probs.
        check_prompt_tokens(batch, self.vocab_size, tokenizer_vocab=getattr(self.tokenizer, "vocab_size", None))
        state, version = self._weights_for(context.behavior_version)
        fields = self.generator.generate(batch, state, version, context=context)
        rows = np.asarray(batch["prompt_tokens"]).shape[0]
        return batch.add(**fields, policy_version=np.full((rows,), version, np.int32))

    def on_barrier(self, *, context: StageContext) -> None:
        metrics = getattr(self.generator, "on_barrier", None)
        if metrics is not None:
            self.last_metrics = dict(metrics(context=context))

    def offload(self) -> None:
        self.holder.offload()

    def onload(self) -> None:
        self.holder.onload()
