"""rlpipe's built-in roles, registered through the ``rlpipe`` entry point ``roles``
exactly as a third-party package registers its own."""

from __future__ import annotations

from rlpipe.core.hookspecs import hookimpl
from rlpipe.roles import critic, reference, reward, reward_model, rollout, trainer


@hookimpl
def rlpipe_roles():
    return [rollout.SPEC, reward.SPEC, reference.SPEC, trainer.SPEC, critic.SPEC, reward_model.SPEC]
