"""The small model, engine and prompts that the engine tests share
(tests/test_sampling.py, tests/test_engine_sampling.py): import the names,
and pytest finds the fixtures."""

import numpy as np
import pytest
from flax import nnx

from rlpipe.models import PRESETS, build
from rlpipe.models.generation import Engine

#: Left-aligned prompts of lengths 3, 5 and 1, padded with 0.
PROMPTS = np.array([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]])
MASK = (PROMPTS != 0).astype(np.int32)


@pytest.fixture(scope="module")
def model():
    """The tiny preset, seed 3."""
    return build(PRESETS["tiny"], seed=3)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(nnx.split(model)[0])
