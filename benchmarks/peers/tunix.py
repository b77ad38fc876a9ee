#!/usr/bin/env python
"""rlpipe against Google Tunix on the same model, the same weights and the same work.

Usage::

    python benchmarks/peers/tunix.py                      # everything; creates .venv-tunix on first use
    python benchmarks/peers/tunix.py --quick              # smaller shapes and fewer repeats (~2 min)
    python benchmarks/peers/tunix.py --only grpo --repeats 5 > tunix.jsonl
    python benchmarks/peers/tunix.py --venv /tmp/tunix-env --no-install   # use (never build) that environment

Tunix is used only as an installed library, through its public API, in a
virtual environment of its own (``--venv``, default ``.venv-tunix`` in the
repository, git-ignored) holding ``google-tunix`` (:data:`TUNIX_VERSION`)
and this repository (``pip install -e .``).  The script creates it when it is
missing (or says why it cannot, and exits 0 having measured nothing), then
re-runs itself with that environment's Python: ONE process imports both
frameworks and runs them interleaved on the same device.

The model: Qwen2, 2 layers, hidden 128, 4 heads, 2 KV heads, head_dim 32,
QKV bias, MLP 512, vocabulary 512, untied, float32.  rlpipe builds it from
``model.architecture`` with random weights; the same arrays are copied into
Tunix's ``tunix.models.qwen2`` module (``tunix_qwen2``), and the logits of the
two are compared on a batch of random tokens (``peer_logits_max_abs_diff``).

Workloads (``--only`` names):

* ``gen_short``: generation, 32 rows, prompt 16, 16 new tokens;
* ``gen_long``: generation, 64 rows, prompt 64, 256 new tokens;
  both sample at temperature 1.0 (top-p 1, top-k off) with per-token
  log-probabilities returned, and every row generates exactly ``new_tokens``
  (rlpipe: ``SamplingParams(ignore_eos=True)`` where the engine has it, else
  no stop tokens; Tunix: a stop token outside the vocabulary, never sampled);
  checked on the outputs;
* ``variable``: 64 prompts whose completions end, by a stop token, after a
  number of tokens drawn uniformly from 16..255 (seeded), with room for 256.
  Both engines get the same lengths because the model is made a *successor
  counter*: the output head row of token ``v`` is the embedding of token
  ``v - 1`` (scaled), and the attention and MLP outputs are scaled by 0.1, so
  after token ``t`` the next token is ``t + 1`` with probability ~1 even at
  temperature 1.  A prompt ending in ``stop - 1 - L`` then yields exactly
  ``L`` tokens before the stop token (``stop = vocab - 1``).  The shapes and
  the FLOPs are those of the random model; only the values differ.  Both
  outputs are checked against the planned lengths.  Value: useful tokens/s =
  tokens before the stop / wall time of the whole call;
* ``grpo``: one GRPO step, 8 prompts x 4 generations x 16 new tokens, KL
  weight 0.04 against a reference model, clip 0.2, one AdamW update (lr 1e-6)
  over the whole batch.  Tunix's ``GRPOLearner.train`` step is: generate
  (its vanilla sampler), reference and old-policy log-probs as needed,
  rewards, advantages, the actor update, and the weight sync to the sampler.
  rlpipe's step matches it: the run's whole global step (rollout, reward,
  reference, trainer update and weight publish) through ``rlpipe.app.driver.train``
  with the default colocated placement.  Each framework's training loop runs
  in its own thread and is stopped at a step boundary (rlpipe: its per-step
  ``report`` callback; Tunix: its dataset iterator, which it reads once at the
  start of each step), so one step of one framework runs at a time; the time
  is from releasing a loop to its next step boundary.  Rewards are a cheap
  host function in both (rlpipe: the ``reverse`` task's own reward on
  15-character prompts; Tunix: the completion's length over 16-token
  prompts).

Every workload is warmed up (compiled) on both frameworks first, then timed
``--repeats`` times interleaved (rlpipe, tunix, rlpipe, tunix, ...).  Records
(benchmarks/results.py schema, JSON lines on stdout): per framework and
workload the median (``peer_generate_throughput`` / ``peer_variable_throughput``
in tokens/s, ``peer_grpo_step_time`` in s, with ``times_s``), and per
workload ``peer_speedup``: the median over repeats of the paired ratio
rlpipe speed / Tunix speed (throughputs; for the step, Tunix time / rlpipe
time), so > 1 means rlpipe is faster.  ``host_load`` records the 1-minute
load average before and after; every record also carries ``host_load_1m``.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# Run as a script, this file's folder is first on sys.path and `import tunix`
# would import this file: the folder goes, benchmarks/ (results.py) comes.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from results import Sink, log, paired_speedup, record, stdout_sink, table

#: The google-tunix release this script was written and measured against.
TUNIX_VERSION = "0.1.7"
DEFAULT_VENV = REPO / ".venv-tunix"
WORKLOADS = ("gen_short", "gen_long", "variable", "grpo")
FRAMEWORKS = ("rlpipe", "tunix")

#: The model both frameworks run (model.architecture keys).
ARCHITECTURE = {"family": "qwen2", "layers": 2, "hidden": 128, "heads": 4, "kv_heads": 2, "head_dim": 32,
                "ffn": 512, "vocab": 512, "qkv_bias": True, "tied": False}


def shapes(quick: bool) -> dict[str, dict[str, int]]:
    """Each workload's shape; ``quick`` shrinks the long ones."""
    if quick:
        return {"gen_short": {"batch": 32, "prompt_len": 16, "new_tokens": 16},
                "gen_long": {"batch": 64, "prompt_len": 64, "new_tokens": 64},
                "variable": {"batch": 64, "prompt_len": 16, "new_tokens": 64, "min_len": 8, "max_len": 63},
                "grpo": {"prompts": 8, "generations": 4, "new_tokens": 16}}
    return {"gen_short": {"batch": 32, "prompt_len": 16, "new_tokens": 16},
            "gen_long": {"batch": 64, "prompt_len": 64, "new_tokens": 256},
            "variable": {"batch": 64, "prompt_len": 16, "new_tokens": 256, "min_len": 16, "max_len": 255},
            "grpo": {"prompts": 8, "generations": 4, "new_tokens": 16}}


# -- the environment -----------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def has_tunix(python: Path) -> bool:
    probe = "import tunix, rlpipe, importlib.metadata as m; print(m.version('google-tunix'))"
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    return done.returncode == 0


def ensure_venv(venv: Path, *, install: bool) -> str | None:
    """Creates (or reuses) ``venv`` with google-tunix and this repository;
    returns ``None`` when it is ready, else why it is not."""
    python = venv_python(venv)
    if python.exists() and has_tunix(python):
        return None
    if not install:
        return f"{venv} has no working google-tunix + rlpipe (and --no-install was given)"
    steps = []
    if not python.exists():
        steps.append([sys.executable, "-m", "venv", str(venv)])
    steps += [[str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
              [str(python), "-m", "pip", "install", "-q", f"google-tunix=={TUNIX_VERSION}"],
              [str(python), "-m", "pip", "install", "-q", "-e", str(REPO)]]
    for cmd in steps:
        log("peer benchmark: " + " ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(cmd)}` failed: " + " | ".join(tail)
    return None if has_tunix(python) else f"{venv}: tunix or rlpipe still does not import after installing"


# -- shared model and data -----------------------------------------------------------------


def host_load() -> float:
    return round(os.getloadavg()[0], 2)


def decoder_shape():
    from rlpipe.models.config import from_architecture
    from rlpipe.runtime.run_config import ArchitectureConfig

    return from_architecture(ArchitectureConfig(**ARCHITECTURE))


def rlpipe_model(seed: int = 0):
    """rlpipe's decoder at :data:`ARCHITECTURE` (float32, random): graphdef and state."""
    from flax import nnx

    from rlpipe.models.loading import init_sharded

    return nnx.split(init_sharded(decoder_shape(), None, seed=seed))


def successor_state(state: Any, *, seed: int = 1) -> Any:
    """``state`` made a successor counter (module docstring): after token ``t``
    the model emits ``t + 1`` (wrapping) with probability ~1 at temperature 1."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    pure = nnx.to_pure_dict(state)
    vocab, hidden = np.shape(pure["embed_tokens"])
    emb = np.random.default_rng(seed).standard_normal((vocab, hidden)).astype(np.float32)
    pure["embed_tokens"] = jnp.asarray(emb)
    pure["lm_head"]["kernel"] = jnp.asarray(0.5 * np.roll(emb, 1, axis=0).T)  # column v = embedding of v - 1
    for layer in pure["layers"].values():
        layer["self_attn"]["o_proj"]["kernel"] = layer["self_attn"]["o_proj"]["kernel"] * 0.1
        layer["mlp"]["down_proj"]["kernel"] = layer["mlp"]["down_proj"]["kernel"] * 0.1
    out = jax.tree.map(lambda x: x, state)  # a new container: ``state`` itself stays as it is
    nnx.replace_by_pure_dict(out, pure)
    return out


def tunix_qwen2(state: Any, *, dtype: Any = None):
    """Tunix's Qwen2 module holding the arrays of rlpipe decoder ``state``."""
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.qwen2 import model as qwen2

    s = decoder_shape()
    dtype = dtype or jnp.float32
    cfg = qwen2.ModelConfig(num_layers=s.num_layers, vocab_size=s.vocab_size, embed_dim=s.hidden_size,
                            hidden_dim=s.intermediate_size, num_heads=s.num_heads, head_dim=s.dim_per_head,
                            num_kv_heads=s.num_kv_heads, rope_theta=int(s.rope_theta), norm_eps=s.rms_norm_eps,
                            use_tied_embedding=s.tie_embeddings, dtype=dtype, param_dtype=dtype)
    model = qwen2.Qwen2(cfg, rngs=nnx.Rngs(0))
    p = nnx.to_pure_dict(state)
    d, n, k, h = s.hidden_size, s.num_heads, s.num_kv_heads, s.dim_per_head
    model.embedder.input_embedding.value = p["embed_tokens"]
    for i, layer in enumerate(model.layers):
        src = p["layers"][i]
        attn = src["self_attn"]
        layer.input_layernorm.w.value = src["input_layernorm"]["scale"]
        layer.post_attention_layernorm.w.value = src["post_attention_layernorm"]["scale"]
        layer.attn.q_proj.w.value = attn["q_proj"]["kernel"].reshape(d, n, h)
        layer.attn.k_proj.w.value = attn["k_proj"]["kernel"].reshape(d, k, h)
        layer.attn.v_proj.w.value = attn["v_proj"]["kernel"].reshape(d, k, h)
        layer.attn.o_proj.w.value = attn["o_proj"]["kernel"].reshape(n, h, d)
        layer.attn.q_bias.value = attn["q_proj"]["bias"]
        layer.attn.k_bias.value = attn["k_proj"]["bias"]
        layer.attn.v_bias.value = attn["v_proj"]["bias"]
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(layer.mlp, name).kernel.value = src["mlp"][name]["kernel"]
    model.final_norm.w.value = p["norm"]["scale"]
    model.lm_head.w.value = p["lm_head"]["kernel"]
    return model


def logits_difference(graphdef: Any, state: Any, tmodel: Any, *, seed: int = 0) -> float:
    """Largest |rlpipe logits - Tunix logits| on 4 x 24 random tokens (no cache)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    tokens = np.random.default_rng(seed).integers(1, ARCHITECTURE["vocab"], size=(4, 24), dtype=np.int32)
    ours = nnx.merge(graphdef, state)(jnp.asarray(tokens))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((24, 24), bool)), (4, 24, 24))
    theirs, _ = tmodel(jnp.asarray(tokens), positions, None, mask)
    return float(jnp.max(jnp.abs(ours.astype(jnp.float32) - theirs.astype(jnp.float32))))


class IdTokenizer:
    """A tokenizer for Tunix whose text is token ids separated by spaces
    (the prompts are made as ids; this keeps Tunix's string API exact)."""

    def __init__(self, *, eos: int, pad: int = 0):
        self._eos, self._pad = eos, pad

    def encode(self, text: str, **_: Any) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self) -> int:
        return 0  # falsy: Tunix adds no BOS

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad


def as_text(rows: Any) -> list[str]:
    return [" ".join(str(int(t)) for t in row) for row in rows]


# -- generation ----------------------------------------------------------------------------


class RlpipeGenerator:
    """rlpipe's built-in engine: one :meth:`Engine.generate` per call."""

    def __init__(self, graphdef: Any, state: Any, *, refill_rows: int | None = None):
        import jax

        from rlpipe.models.generation import Engine

        self.engine, self.state = Engine(graphdef, cache_dtype=jax.numpy.float32), state
        self.key = jax.random.key(0)
        self.refill_rows = refill_rows  # continuous batching (Engine.generate_refill) on this many rows

    def __call__(self, prompts: Any, new_tokens: int, *, stop: int | None, repeat: int) -> list[int]:
        """Generates; returns each row's token count up to and including a stop token."""
        import attrs
        import jax
        import numpy as np

        from rlpipe.models.generation import SamplingParams

        fields = {f.name for f in attrs.fields(SamplingParams)}
        if stop is None:
            # Every row generates new_tokens: ignore_eos where the engine has it, else no stop token.
            params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0,
                                    **({"ignore_eos": True} if "ignore_eos" in fields else {}))
        else:
            params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, stop_tokens=(stop,))
        if self.refill_rows:
            out = self.engine.generate_refill(self.state, prompts, np.ones_like(prompts, dtype=bool),
                                              jax.random.fold_in(self.key, repeat), params, rows=self.refill_rows)
        else:
            out = self.engine.generate(self.state, prompts, np.ones_like(prompts, dtype=bool),
                                       jax.random.fold_in(self.key, repeat), params)
        return [int(n) for n in out.mask.sum(axis=1)]


class TunixGenerator:
    """Tunix's ``Sampler`` (its vanilla generation engine): one call per call."""

    def __init__(self, model: Any, *, cache_size: int):
        from tunix.generate import sampler as sampler_lib

        s = decoder_shape()
        self.vocab = s.vocab_size
        cache = sampler_lib.CacheConfig(cache_size=cache_size, num_layers=s.num_layers, num_kv_heads=s.num_kv_heads,
                                        head_dim=s.dim_per_head)
        self.sampler = sampler_lib.Sampler(model, IdTokenizer(eos=self.vocab), cache)

    def __call__(self, prompts: Any, new_tokens: int, *, stop: int | None, repeat: int) -> list[int]:
        # A stop token outside the vocabulary is never sampled: every row runs to new_tokens.
        eos = [self.vocab] if stop is None else [stop]
        out = self.sampler(as_text(prompts), max_generation_steps=new_tokens, max_prompt_length=prompts.shape[1],
                           eos_tokens=eos, temperature=1.0, top_p=1.0, top_k=None, return_logprobs=True,
                           seed=repeat)
        # Tunix cuts each row before its stop token; count it as rlpipe does.
        return [len(t) + (1 if stop is not None and len(t) < new_tokens else 0) for t in out.tokens]


# -- GRPO ----------------------------------------------------------------------------------


class Gate:
    """Holds a training loop that runs in its own thread at its step
    boundaries, so the caller lets it take one step at a time and times it."""

    def __init__(self):
        self._go = threading.Semaphore(0)
        self._arrived: queue.Queue[float] = queue.Queue()
        self.finish = False
        self.error: BaseException | None = None

    def boundary(self, *_: Any) -> None:
        """Called by the loop (in its thread) between two steps."""
        self._arrived.put(time.perf_counter())
        self._go.acquire()

    def arrive(self, timeout: float) -> float:
        while True:
            try:
                return self._arrived.get(timeout=1.0)
            except queue.Empty:
                if self.error is not None:
                    raise RuntimeError(f"the training loop failed: {self.error!r}") from self.error
                timeout -= 1.0
                if timeout <= 0:
                    raise TimeoutError("the training loop did not reach its next step") from None

    def step(self, timeout: float = 1800.0) -> float:
        """Lets the loop run one step; returns its wall time."""
        start = time.perf_counter()
        self._go.release()
        return self.arrive(timeout) - start

    def release(self) -> None:
        self.finish = True
        self._go.release()


def run_in_thread(gate: Gate, fn: Callable[[], Any]) -> threading.Thread:
    def target():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the gate
            gate.error = exc
            gate._arrived.put(float("nan"))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def rlpipe_grpo(shape: dict[str, int], steps: int, run_dir: Path) -> tuple[Gate, threading.Thread, Callable[[], int]]:
    """rlpipe's GRPO run of ``steps`` steps, held at each step's end; and
    how many steps it has finished (its ``metrics.jsonl`` rows)."""
    from rlpipe.app import defaults, driver
    from rlpipe.core.plugins import load_registry
    from rlpipe.runtime.run_config import build_config

    overrides = {
        "model": {"architecture": dict(ARCHITECTURE), "compute_dtype": "float32"},
        # 14 digits and '>' (15 characters) with the character tokenizer: a 16-token bucket.
        "task": {"name": "reverse", "options": {"min_digits": 14, "max_digits": 14}},
        "algorithm": {"name": "grpo"},
        "roles": {"rollout": {"num_generations": shape["generations"], "max_new_tokens": shape["new_tokens"],
                              "temperature": 1.0},
                  # Tunix scores and trains the whole batch (its mini-batch: every prompt) in one
                  # pass each; rlpipe's reference defaults to 8-row passes, so it is told the same.
                  "reward": {}, "reference": {"micro_batch_size": shape["prompts"] * shape["generations"]},
                  "trainer": {"learning_rate": 1e-6, "micro_batch_size": shape["prompts"] * shape["generations"],
                              "num_iterations": 1}},
        "train": {"steps": steps, "seed": 0, "max_staleness": 0, "prompts_per_item": shape["prompts"],
                  "items_per_step": 1},
        "checkpoint": {"every": 0, "asynchronous": False},
    }
    data, _ = defaults.resolve()
    from rlpipe.core.config import merge

    registry = load_registry()
    config = build_config(merge(data, overrides), registry)
    gate = Gate()
    thread = run_in_thread(gate, lambda: driver.train(config, registry, run_dir=run_dir, report=gate.boundary))

    def steps_done() -> int:
        path = run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    return gate, thread, steps_done


def tunix_grpo(state: Any, shape: dict[str, int], steps: int, tmp: Path) -> tuple[Gate, threading.Thread, Callable[[], int]]:
    """Tunix's ``GRPOLearner`` on the same weights, held at each step's start;
    and how many actor updates it has made."""
    import jax
    import numpy as np
    import optax
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    vocab, eos = ARCHITECTURE["vocab"], 2
    prompt_len, new = 16, shape["new_tokens"]
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    actor, reference = tunix_qwen2(state), tunix_qwen2(state)
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adamw(1e-6), eval_every_n_steps=10**9, max_steps=steps + 1,
        mini_batch_size=shape["prompts"], checkpoint_root_directory=str(tmp / "tunix-ckpt"))
    rollout = base_rollout.RolloutConfig(max_tokens_to_generate=new, max_prompt_length=prompt_len,
                                         kv_cache_size=prompt_len + new, temperature=1.0, top_p=1.0, top_k=None,
                                         eos_tokens=[eos])
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=IdTokenizer(eos=eos),
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                          rl_cluster_lib.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout))

    def reward(prompts, completions, **_):
        return [len(c.split()) / new for c in completions]

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=reward,
        algo_config=grpo_learner.GRPOConfig(num_generations=shape["generations"], num_iterations=1, beta=0.04,
                                            epsilon=0.2))
    rng = np.random.default_rng(0)
    gate = Gate()

    def batches():
        while True:
            gate.boundary()
            if gate.finish:
                return
            ids = rng.integers(3, vocab, size=(shape["prompts"], prompt_len))
            yield {"prompts": np.array(as_text(ids))}

    return gate, run_in_thread(gate, lambda: learner.train(batches())), lambda: int(cluster.actor_trainer.train_steps)


# -- measuring -----------------------------------------------------------------------------


def measure(*, only: Sequence[str] = WORKLOADS, repeats: int = 5, quick: bool = False,
            frameworks: Sequence[str] = FRAMEWORKS, shape_overrides: dict[str, dict[str, int]] | None = None,
            refill_rows: int | None = 16, emit: Sink | None = None) -> list[dict[str, Any]]:
    """Runs the workloads in ``only`` for ``frameworks`` (``("rlpipe",)``
    needs no Tunix) and returns their records (module docstring)."""
    import jax
    import numpy as np

    emit = emit or stdout_sink()
    plan = shapes(quick)
    for name, override in (shape_overrides or {}).items():
        plan[name] = {**plan[name], **override}
    dev = jax.devices()[0]
    versions = {"jax": jax.__version__}
    if "tunix" in frameworks:
        from importlib import metadata

        versions["tunix"] = metadata.version("google-tunix")
    base = {"platform": dev.platform, "device_kind": dev.device_kind, "dtype": "float32", **versions,
            "model": "qwen2 " + " ".join(f"{k}={v}" for k, v in ARCHITECTURE.items())}
    records: list[dict[str, Any]] = []

    def add(name: str, value: Any, unit: str, **fields: Any) -> None:
        records.append(emit(record(name, value, unit, **base, **fields, host_load_1m=host_load())))

    add("host_load", host_load(), "load", when="start", cpus=os.cpu_count())
    graphdef, state = rlpipe_model()
    if "tunix" in frameworks:
        add("peer_logits_max_abs_diff", logits_difference(graphdef, state, tunix_qwen2(state)), "abs",
            note="same weights in both models: logits on 4 x 24 random tokens")

    rng = np.random.default_rng(0)
    for workload in [w for w in WORKLOADS if w in only and w != "grpo"]:
        shape = plan[workload]
        batch, prompt_len, new = shape["batch"], shape["prompt_len"], shape["new_tokens"]
        vocab = ARCHITECTURE["vocab"]
        if workload == "variable":
            stop = vocab - 1
            lengths = rng.integers(shape["min_len"], shape["max_len"] + 1, size=batch)
            prompts = rng.integers(1, vocab // 2, size=(batch, prompt_len)).astype(np.int32)
            prompts[:, -1] = stop - 1 - lengths  # the successor model counts up to the stop token
            wstate, useful = successor_state(state), int(lengths.sum())
            expected = [int(n) + 1 for n in lengths]
        else:
            stop, wstate = None, state
            prompts = rng.integers(1, vocab, size=(batch, prompt_len)).astype(np.int32)
            useful, expected = batch * new, [new] * batch
        engines: dict[str, Callable[..., list[int]]] = {}
        for fw in frameworks:
            engines[fw] = (RlpipeGenerator(graphdef, wstate) if fw == "rlpipe"
                           else TunixGenerator(tunix_qwen2(wstate), cache_size=prompt_len + new))
        if workload == "variable" and refill_rows and "rlpipe" in frameworks:
            # rlpipe's continuous batching (roles.rollout.refill_rows): a finished row takes the next prompt.
            engines["rlpipe_refill"] = RlpipeGenerator(graphdef, wstate, refill_rows=refill_rows)
        fields = {"workload": workload, **shape, "useful_tokens": useful}
        for fw, gen in engines.items():
            log(f"{workload}: {fw}: first call (compile) ...")
            t = time.perf_counter()
            got = gen(prompts, new, stop=stop, repeat=0)
            first = time.perf_counter() - t
            exact = got == expected
            if not exact and workload != "variable":
                raise RuntimeError(f"{fw} generated {sum(got)} tokens, expected {sum(expected)}")
            add("peer_first_call", first, "s", framework=fw, **fields,
                rows_as_planned=sum(a == b for a, b in zip(got, expected)))
        times: dict[str, list[float]] = {fw: [] for fw in engines}
        for r in range(repeats):
            for fw, gen in engines.items():
                t = time.perf_counter()
                gen(prompts, new, stop=stop, repeat=r + 1)
                times[fw].append(time.perf_counter() - t)
        name = "peer_variable_throughput" if workload == "variable" else "peer_generate_throughput"
        speeds = {fw: [useful / t for t in ts] for fw, ts in times.items()}
        for fw, ts in times.items():
            add(name, useful / statistics.median(ts), "tokens/s", framework=fw, **fields,
                times_s=[round(t, 6) for t in ts], repeats=repeats)
        if "tunix" in engines:
            for fw in [f for f in engines if f.startswith("rlpipe")]:
                add("peer_speedup", paired_speedup(speeds[fw], speeds["tunix"]), "x", peer="tunix", framework=fw,
                    **fields, definition=f"median over repeats of {fw} tokens/s / tunix tokens/s (>1: rlpipe faster)")

    if "grpo" in only:
        shape = plan["grpo"]
        warmup = 2
        steps = warmup + repeats
        fields = {"workload": "grpo", **shape, "warmup_steps": warmup}
        with tempfile.TemporaryDirectory(prefix="rlpipe-peer-") as tmp:
            gates: dict[str, tuple[Gate, threading.Thread]] = {}
            counters: dict[str, Callable[[], int]] = {}
            for fw in frameworks:
                log(f"grpo: {fw}: building and compiling ({warmup} warm-up steps) ...")
                t = time.perf_counter()
                if fw == "rlpipe":
                    gate, thread, counters[fw] = rlpipe_grpo(shape, steps, Path(tmp) / "rlpipe-run")
                    gate.arrive(1800.0)  # step 0 ran on its own
                    for _ in range(warmup - 1):
                        gate.step()
                else:
                    gate, thread, counters[fw] = tunix_grpo(state, shape, steps, Path(tmp))
                    gate.arrive(1800.0)  # asked for step 0's data
                    for _ in range(warmup):
                        gate.step()
                gates[fw] = (gate, thread)
                add("peer_first_call", time.perf_counter() - t, "s", framework=fw, **fields,
                    note="building the run and its first warmup_steps steps")
            times = {fw: [] for fw in gates}
            for _ in range(repeats):
                for fw, (gate, _) in gates.items():
                    times[fw].append(gate.step())
            done = {fw: counters[fw]() for fw in gates}  # before the loops finish
            for fw, (gate, thread) in gates.items():
                gate.release()
                thread.join(timeout=600)
            for fw, ts in times.items():
                add("peer_grpo_step_time", statistics.median(ts), "s", framework=fw, **fields,
                    times_s=[round(t, 6) for t in ts], repeats=repeats, steps_done=done[fw])
            if len(gates) == 2:
                add("peer_speedup", paired_speedup(times["tunix"], times["rlpipe"]), "x", peer="tunix", **fields,
                    definition="median over repeats of tunix step time / rlpipe step time (>1: rlpipe faster)")
    add("host_load", host_load(), "load", when="end", cpus=os.cpu_count())
    return records


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="Tunix's virtual environment (default: %(default)s)")
    p.add_argument("--no-install", action="store_true", help="never create or install into --venv")
    p.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per framework (default 5; --quick 3)")
    p.add_argument("--quick", action="store_true", help="shorter generations, 3 repeats: a couple of minutes")
    p.add_argument("--rlpipe-only", action="store_true", help="measure rlpipe alone (no Tunix, no venv)")
    p.add_argument("--refill-rows", type=int, default=16,
                   help="also time rlpipe's continuous batching on this many rows on the variable-length workload "
                        "(0: not)")
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in the venv
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not args.inside and not args.rlpipe_only:
        why = ensure_venv(args.venv.resolve(), install=not args.no_install)
        if why is not None:
            log(f"peer benchmark skipped: Tunix is not available: {why}")
            return 0
        cmd = [str(venv_python(args.venv.resolve())), str(Path(__file__).resolve()), *argv, "--inside"]
        return subprocess.run(cmd, check=False).returncode
    streams = [sys.stdout]
    out = None
    if args.out:
        out = args.out.open("a")
        streams.append(out)
    try:
        records = measure(only=args.only, repeats=args.repeats or (3 if args.quick else 5), quick=args.quick,
                          frameworks=("rlpipe",) if args.rlpipe_only else FRAMEWORKS, refill_rows=args.refill_rows or None,
                          emit=Sink(streams))
    finally:
        if out is not None:
            out.close()
    table(records, labels=("workload", "framework"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
