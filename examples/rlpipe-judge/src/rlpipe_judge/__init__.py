"""An example rlpipe plugin package: a ``judge`` role and a ``spread`` policy.

* ``judge`` scores every completion on the host and adds ``judge_scores``
  (one float per completion, ``[prompts, num_generations]`` like ``rewards``).
  ``roles.reward.terms: {judge_scores: 0.5}`` adds half of it to every
  completion's reward (the reward role then runs after the judge, and logs
  ``reward/judge_scores``); without a term nothing consumes the field, so
  rlpipe routes it into the trainer, which sees it in its batches.
  The score here is a transparent heuristic — the share of distinct tokens in
  the completion, which punishes degenerate repetition — standing in for a
  model-based judge, which would be built the same way.
* ``spread`` is a colocation policy that gives every role an equal, disjoint
  slice of the devices (the trainer takes any remainder).

Install with ``pip install -e examples/rlpipe-judge``; then
``rlpipe roles list`` shows ``judge``, ``--set roles.judge={}`` adds it to the
graph, ``--set roles.reward.terms={judge_scores: 0.5}`` makes its score count
towards the reward and ``--set placement.policy=spread`` selects the policy.
"""

from __future__ import annotations

import attrs
import numpy as np

from rlpipe import (
    Batch,
    MeshSpec,
    PlacementError,
    PolicySpec,
    Problem,
    RoleConfig,
    RolePlacement,
    RoleSpec,
    StageContext,
    check,
    finish_plan,
    hookimpl,
)


@attrs.frozen(kw_only=True)
class JudgeConfig(RoleConfig):
    """``roles.judge``: placement keys (inherited) plus the judge's own.

    Attributes:
        weight: multiplies every score (the reward counts it with the weight
            of its ``roles.reward.terms`` entry on top).
        min_tokens: completions shorter than this score 0.
    """

    weight: float = attrs.field(default=1.0, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))
    min_tokens: int = attrs.field(default=1, validator=check(lambda v: v >= 0, "must be at least 0, got {value}"))


class JudgeStage:
    """Scores completions ``[prompts, num_generations, tokens]`` (any leading
    shape): distinct valid tokens / valid tokens, one float32 per completion."""

    def __init__(self, config: JudgeConfig):
        self.config = config

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        tokens = np.asarray(batch["completion_tokens"])
        mask = np.asarray(batch["completion_mask"]).astype(bool)
        scores = np.zeros(tokens.shape[:-1], dtype=np.float32)
        for index in np.ndindex(scores.shape):
            valid = tokens[index][mask[index]]
            if valid.size >= max(self.config.min_tokens, 1):
                scores[index] = self.config.weight * len(np.unique(valid)) / valid.size
        return batch.add(judge_scores=scores)


def _judge_factory(config: JudgeConfig, placement: RolePlacement, *, context) -> JudgeStage:
    return JudgeStage(config)


@attrs.frozen
class SpreadPolicy:
    """Every role on its own equal slice of the devices; the graph's sink gets the remainder."""

    def plan(self, requests, devices, *, context):
        n, k = len(devices), len(requests)
        if n < k:
            raise PlacementError(Problem("placement.policy", f"spread needs a device per role: {k} roles, {n} devices"))
        share = n // k
        ids = [d.id for d in devices]
        sizes = {r.name: share for r in requests}
        sink = context.sink if context.sink in sizes else requests[-1].name
        sizes[sink] += n - share * k
        placed, start = [], 0
        for r in requests:
            size = sizes[r.name]
            mesh = r.mesh if r.mesh is not None and r.mesh.size == size else MeshSpec.default(size)
            placed.append(RolePlacement(name=r.name, devices=ids[start:start + size], mesh=mesh, offload=r.offload))
            start += size
        return finish_plan("spread", placed, devices, context)


@hookimpl
def rlpipe_roles():
    yield RoleSpec(
        name="judge",
        description="scores completions on the host (distinct-token ratio) and adds judge_scores",
        config_type=JudgeConfig,
        consumes={"completion_tokens", "completion_mask"},
        produces={"judge_scores"},
        factory=_judge_factory,
    )


@hookimpl
def rlpipe_placement_policies():
    yield PolicySpec(name="spread", description="each role on an equal disjoint device slice",
                     factory=lambda options: SpreadPolicy())
