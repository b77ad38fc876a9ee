"""The embedded default configuration, and where each value of a run's config comes from.

A run's config is built in layers, each overriding the ones before it:

1. **built-in defaults**: the config classes' own defaults, chosen for a
   pretrained language model (a learning rate of 1e-6, gradient clipping at
   1.0, GRPO's KL weight of 0.04, ...);
2. **the embedded default run** (:data:`RUN_DEFAULTS`): what ``rlpipe train``
   runs with no config file — the ``tiny`` model on the ``reverse`` task;
3. **the model preset's defaults** (:data:`PRESET_DEFAULTS`), applied only
   when the run's model is that preset (``model.preset`` without
   ``model.path``): the values tuned for the randomly initialised ``tiny``
   model (its learning rate of 5e-3, its batch shapes) belong to it alone, so
   a run on a pretrained model never inherits them;
4. each ``-c`` file in order, then each ``--set``.

:func:`resolve` returns the merged data and, for ``rlpipe config show``, the
layer each value came from.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Layer 2: the embedded default run (the model and the task; nothing tuned for the model).
RUN_DEFAULTS: dict = {
    "model": {
        "preset": "tiny",
        "dtype": "float32",
    },
    # Two-digit strings and the task's dense ``digits`` reward on top of
    # ``partial-match``: the reward (at most 2) rises from ~0.07 to ~1.7 in 20
    # steps of the tiny preset: digits first, then right digits.
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

#: Layer 3: per model preset, the values tuned for it.
PRESET_DEFAULTS: dict[str, dict] = {
    # Sized so the random-init tiny model visibly learns in 20 steps on a CPU:
    # 512 completions a step (2 items × 32 prompts × 8), a completion budget of
    # exactly the default task's answer length (no end-of-sequence token to
    # learn first), 8 PPO-clipped updates per step at a learning rate for a
    # small randomly initialised model.
    "tiny": {
        "roles": {
            "rollout": {"num_generations": 8, "max_new_tokens": 2},
            "trainer": {"learning_rate": 5e-3, "micro_batch_size": 64, "num_iterations": 8},
        },
        "train": {"prompts_per_item": 32, "items_per_step": 2},
    },
    # SmolLM2-135M-Instruct degenerates when sampled at T = 1.0 over its whole
    # vocabulary; T = 0.7 keeps groups diverse and on-topic.  Its 30 layers run
    # as a rematerialised scan in the trainer: on 2 CPU cores, step 0 of a
    # small GRPO run took 60 s instead of 93 s and the process peaked at
    # 6.7 GB instead of 7.8 GB (docs/learning.md).
    "smollm2-135m-instruct": {
        "roles": {"rollout": {"temperature": 0.7}, "trainer": {"remat": True}},
    },
}


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


#: What ``rlpipe train`` runs with no config file: layers 2 and 3 for the
#: ``tiny`` preset (also the base that tests and examples merge onto).
DEFAULT_CONFIG: dict = _merge(RUN_DEFAULTS, PRESET_DEFAULTS["tiny"])


def model_preset(data: Mapping[str, Any]) -> str | None:
    """The preset whose defaults apply to merged config ``data``: ``model.preset``
    unless ``model.path`` names a checkpoint or ``model.architecture`` a shape."""
    model = data.get("model") or {}
    if not isinstance(model, Mapping) or model.get("path") or model.get("architecture"):
        return None
    preset = model.get("preset")
    return preset if isinstance(preset, str) else None


def layers(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """The labelled layers 2-4 of a run's config, in order (see the module docstring).

    Raises:
        ConfigError: a file or an override does not parse.
    """
    from rlpipe.core.config import parse_override, read_yaml_file, resolve_sources
    from rlpipe.runtime.run_config import SELECTING_KEYS

    user = [(f"file {f}", read_yaml_file(f)) for f in files] + [(f"--set {o}", parse_override(o)) for o in overrides]
    first = resolve_sources(RUN_DEFAULTS, files, overrides, selecting=SELECTING_KEYS)
    preset = model_preset(first)
    out = [("embedded default", RUN_DEFAULTS)]
    if preset in PRESET_DEFAULTS:
        out.append((f"preset {preset}", PRESET_DEFAULTS[preset]))
    return out + user


def resolve(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> tuple[dict, dict[str, str]]:
    """A run's merged config data (layers 2-4) and, for each dotted key it
    sets, the label of the layer that set it last (``embedded default``,
    ``preset tiny``, ``file x.yaml``, ``--set k=v``).  Keys it leaves out take
    the built-in defaults."""
    from rlpipe.core.config import merge_source
    from rlpipe.runtime.run_config import SELECTING_KEYS

    stack = layers(files, overrides)
    data: dict = {}
    source: dict[str, str] = {}
    for label, layer in stack:
        for section, key in SELECTING_KEYS.items():
            chosen = (layer.get(section) or {}).get(key) if isinstance(layer.get(section), Mapping) else None
            if chosen is not None and chosen != (data.get(section) or {}).get(key):
                # Another plugin selected: its options start again from its own defaults.
                source = {k: v for k, v in source.items() if not k.startswith(f"{section}.options.")}
        data = merge_source(data, layer, SELECTING_KEYS)
        for key in _leaves(layer):
            source[key] = label
    return data, source


def _leaves(data: Any, prefix: str = "") -> Iterable[str]:
    """Dotted keys of the values in ``data`` that are not mappings (an empty
    section sets nothing: its keys keep the layers below)."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


def source_of(key: str, sources: Mapping[str, str]) -> str:
    """The layer that set dotted ``key``: its own entry, else the nearest
    enclosing key's (a whole section set at once), else ``built-in default``."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        label = sources.get(".".join(parts[:n]))
        if label is not None:
            return label
    return "built-in default"
