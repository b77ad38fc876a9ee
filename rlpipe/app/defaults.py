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
    # Sized so the random-init tiny model visibly learns in 20 steps on a CPU
    # (about half a minute): two-digit strings, a completion budget of exactly
    # the answer's length (no end-of-sequence token to learn first), and the
    # task's dense ``digits`` reward on top of ``partial-match``.  The reward
    # (at most 2) rises from ~0.07 to ~1.7: digits first, then right digits.
    "task": {
        "name": "reverse",
        "options": {"min_digits": 2, "max_digits": 2},
    },
    "algorithm": {
        "name": "grpo",
    },
    # A role is in the graph when it has a section here; ``roles.<name>: null``
    # (or ``--set roles.<name>=null``) removes it.
    "roles": {
        "rollout": {"num_generations": 8, "max_new_tokens": 2},
        "reward": {},
        "reference": {},
        # 512 completions a step, 8 updates on them (PPO-clipped), at a learning
        # rate for a small randomly initialised model.
        "trainer": {"learning_rate": 5e-3, "micro_batch_size": 64, "num_iterations": 8},
    },
    "placement": {
        "policy": "default",
        "offload": False,
    },
    "train": {
        "steps": 20,
        "seed": 0,
        "max_staleness": 0,
        "prompts_per_item": 32,
        "items_per_step": 2,
    },
}
