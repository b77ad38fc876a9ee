"""The embedded default configuration: what ``rlpipe`` runs with no config file.

Every file and ``--set`` override is merged on top of this, so a config only
states what it changes.  ``rlpipe config show`` prints the result.
"""

from __future__ import annotations

DEFAULT_CONFIG: dict = {
    "model": {
        "preset": "tiny",
        "dtype": "float32",
    },
    # A role is in the graph when it has a section here; ``roles.<name>: null``
    # (or ``--set roles.<name>=null``) removes it.
    "task": {
        "name": "reverse",
    },
    "algorithm": {
        "name": "grpo",
    },
    "roles": {
        "rollout": {},
        "reward": {},
        "reference": {},
        "trainer": {},
    },
    "placement": {
        "policy": "default",
        "offload": False,
    },
    "train": {
        "steps": 20,
        "seed": 0,
        "max_staleness": 0,
    },
}
