"""rlpipe's built-in colocation policies, registered through the ``rlpipe`` entry
point ``placement`` exactly as a third-party package registers its own."""

from __future__ import annotations

from rlpipe.core.hookspecs import hookimpl
from rlpipe.core.specs import PolicySpec
from rlpipe.plugins.placement.auto import AutoPolicy
from rlpipe.plugins.placement.colocate_all import ColocateAllPolicy
from rlpipe.plugins.placement.default import DefaultPolicy
from rlpipe.plugins.placement.disaggregated import (
    DisaggregatedOptions,
    DisaggregatedPolicy,
)


@hookimpl
def rlpipe_placement_policies():
    return [
        PolicySpec(name="default", description="colocate_with semantics: roles share the trainer's devices unless they own a mesh",
                   factory=lambda options: DefaultPolicy()),
        PolicySpec(name="colocate-all", description="every role on every device",
                   factory=lambda options: ColocateAllPolicy()),
        PolicySpec(name="disaggregated", description="disjoint device groups by fraction (options.groups)",
                   factory=lambda options: DisaggregatedPolicy(options or DisaggregatedOptions()),
                   config_type=DisaggregatedOptions),
        PolicySpec(name="auto", description="colocated, rollout disaggregated or colocated+offload: the first that fits device memory",
                   factory=lambda options: AutoPolicy()),
    ]
