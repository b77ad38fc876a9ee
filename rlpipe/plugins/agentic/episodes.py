"""Multi-turn episodes: the policy and an environment, many episodes at once.

:class:`EpisodeRunner` runs the episodes of one item (``prompts ×
num_generations``) to the end:

* up to ``max_concurrency`` episodes are **in flight** at once; each turn,
  the next tokens of every episode in flight are generated in **one batched
  call** of the rollout engine (its context — prompt, earlier turns and
  observations — as the prompt); an episode that ends frees its row for the
  next waiting one;
* every turn of every episode is generated with the **same parameters**
  (the policy version the caller chose), so an episode never mixes versions;
* environment steps run on the host, between generation calls, on up to
  ``environment.workers`` threads at once (an environment waiting on I/O —
  a sandbox, a web service — then holds up no other episode); each episode's
  own calls stay in order, and their results are applied in episode order,
  so a run whose environments are independent of each other is
  reproducible however many workers there are.

Each episode's completion is laid out as ``reset observation | turn 1 | obs 1
| turn 2 | ...`` (see :mod:`rlpipe.plugins.agentic.environment`): the policy's
tokens have loss mask 1 and their sampling log-probs, the environment's have
loss mask 0 (and log-prob 0) but attention mask 1, so the trainer computes
log-probs in the context the policy saw and trains only on what it chose.

An episode ends as ``done`` (the environment said so), ``truncated`` (out
of turns or tokens) or ``failed`` (the environment raised, or took longer
than the time limit: ``timeout_s`` bounds the time an episode spends in its
environment — ``reset`` and ``step`` together — so a slow episode cannot
fail the others in flight with it; a call still running at the limit is
abandoned on its daemon thread).  A failed episode keeps its tokens for inspection but
gets loss mask 0 everywhere and reward 0; it is counted, never dropped.

On the run's timeline each episode is a span ``episode`` on a **lane** of
the rollout (the detail track ``rollout/episodes NN``; an episode takes the
lowest free lane when it starts, so there are at most ``max_concurrency``
lanes), holding its ``reset``, then per turn ``generate`` (the batched call
its turn was part of) and ``step`` (its environment call, with the ``tool``
spans the environment records inside).
"""

from __future__ import annotations

import contextlib
import heapq
import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ContextManager

import attrs
import numpy as np

from rlpipe.models.prompts import pad_prompts
from rlpipe.plugins.agentic.environment import EnvironmentContext
from rlpipe.plugins.agentic.tools import CallTimeout, call_with_timeout
from rlpipe.runtime.trace import detail_track

#: Rows of a generation call are padded up to a power of two, at least this
#: many, so a handful of programs are compiled however many episodes remain.
MIN_ROWS = 8


class Tracer:
    """Where the runner records its spans: ``span(name, **args)`` (a context
    manager, on the rollout's own track), and ``now()`` with
    ``complete(lane, name, start, end, **args)`` (a finished span on an
    episode lane).  This one records nothing."""

    def span(self, name: str, **args: Any) -> ContextManager[None]:
        return contextlib.nullcontext()

    def now(self) -> float:
        return 0.0

    def complete(self, lane: int, name: str, start: float, end: float, **args: Any) -> None:
        return None

    @contextlib.contextmanager
    def lane_span(self, lane: int, name: str, **args: Any) -> Iterator[None]:
        """A span on episode lane ``lane`` around the block."""
        start = self.now()
        try:
            yield
        finally:
            self.complete(lane, name, start, self.now(), **args)


class StageTracer(Tracer):
    """Spans on a stage's track of the run's timeline, and its episode lanes
    (the detail tracks ``<role>/episodes NN``)."""

    def __init__(self, context: Any):
        self.context = context
        self.trace = getattr(context, "trace", None)

    def span(self, name: str, **args: Any) -> ContextManager[None]:
        return self.context.span(name, **args)

    def now(self) -> float:
        return self.trace.now_us() if self.trace is not None else 0.0

    def complete(self, lane: int, name: str, start: float, end: float, **args: Any) -> None:
        if self.trace is not None:
            self.trace.complete(detail_track(self.context.role, f"episodes {lane:02d}"), name, start, end,
                                step=self.context.step, index=self.context.index, **args)


@attrs.define
class Episode:
    """One episode's record; the runner fills it in as the episode goes."""

    index: int
    prompt: list[int]
    example: Any
    env: Any = None
    tokens: list[int] = attrs.field(factory=list)
    policy: list[bool] = attrs.field(factory=list)
    logprobs: list[float] = attrs.field(factory=list)
    actions: list[str] = attrs.field(factory=list)
    observations: list[str] = attrs.field(factory=list)
    turns: int = 0
    reward: float = 0.0
    status: str = "running"
    error: str = ""
    max_turns: int = 1
    max_tokens: int = 0
    lane: int = 0
    last_kept: int = 0
    started: float = 0.0
    started_us: float = 0.0
    seconds: float = 0.0
    env_seconds: float = 0.0
    metrics: dict[str, float] = attrs.field(factory=dict)

    @property
    def policy_tokens(self) -> int:
        return int(sum(self.policy))

    @property
    def env_tokens(self) -> int:
        return len(self.tokens) - self.policy_tokens


@attrs.frozen
class EpisodeBatch:
    """The episodes of one :meth:`EpisodeRunner.run`, in input order, and their
    fields ``[episodes, max_tokens]`` (numpy, host)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    logprobs: np.ndarray
    rewards: np.ndarray
    episodes: list[Episode]


class _Failure(Exception):
    """Ends an episode as failed, with the reason."""


class EpisodeRunner:
    """Runs episodes of an environment against the policy.

    Args:
        spec: the environment's :class:`rlpipe.core.specs.EnvironmentSpec`.
        options: its options (already structured).
        section: the :class:`~rlpipe.plugins.agentic.environment.EnvironmentSection`
            (turn limit, per-turn tokens, timeout).
        engine: a rollout engine (``generate(state, tokens, mask, key, params,
            *, sharding)``).
        params: the sampling parameters of one turn (``max_new_tokens`` is the
            per-turn budget).
        max_tokens: each episode's completion budget, policy and environment
            tokens together (the width of the output fields).
        max_concurrency: episodes in flight at once; ``None``: all of them.
    """

    def __init__(self, *, spec: Any, options: Any, section: Any, run_config: Any, registry: Any, tokenizer: Any,
                 engine: Any, params: Any, max_tokens: int, max_concurrency: int | None = None):
        self.spec, self.options, self.section = spec, options, section
        self.run_config, self.registry, self.tokenizer = run_config, registry, tokenizer
        self.engine, self.params = engine, params
        self.max_tokens = int(max_tokens)
        self.max_concurrency = max_concurrency
        self.reuse_cache = bool(getattr(section, "reuse_cache", True))
        #: Tokens prefilled (written to the KV cache before sampling) by the last :meth:`run`.
        self.prefill_tokens = 0
        #: KV-cache sessions the last :meth:`run` opened (0: every turn prefilled its whole context).
        self.cache_sessions = 0

    # -- the loop ---------------------------------------------------------------------

    def run(self, state: Any, prompts: Sequence[Sequence[int]], examples: Sequence[Any], key: Any, *,
            tracer: Tracer | None = None, device: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
            sharding: Any = None, seed: int = 0, policy_version: int | None = None,
            host: Any = None) -> EpisodeBatch:
        """Runs one episode per prompt (``prompts[i]`` a list of token ids,
        ``examples[i]`` its task example) and returns them laid out as fields.

        Args:
            state: the policy's parameters, used for every turn.
            key: PRNG key; the first generation call samples with it, call
                ``t > 0`` with ``fold_in(key, t)``.
            device: a context manager around each generation call (the
                rollout's ``on_devices(mesh)``).
            seed: mixed into each episode's environment seed.
            host: a :class:`rlpipe.runtime.distributed.HostLeader` when the rollout's
                devices span several processes: the leader runs the
                environments and the others take its episodes (generation
                runs on every process, in lockstep); ``None``: this process
                runs them.
        """
        import jax

        tracer = tracer or Tracer()
        episodes = [Episode(index=i, prompt=list(map(int, p)), example=ex) for i, (p, ex) in enumerate(zip(prompts, examples))]
        cap = len(episodes) if self.max_concurrency is None else min(self.max_concurrency, len(episodes))
        waiting, active = deque(episodes), []
        self.prefill_tokens = self.cache_sessions = 0
        turns: _PrefilledTurns | _CachedTurns | None = None
        lanes = list(range(cap))  # free episode lanes of the timeline (a heap: the lowest is taken first)
        batch_no = 0
        with _host_map(max(1, min(self.section.workers, cap))) as host_map:
            while waiting or active:
                starting = []
                while waiting and len(active) + len(starting) < cap:
                    starting.append(waiting.popleft())
                    starting[-1].lane = heapq.heappop(lanes)
                self._host_phase(host, starting, lambda: host_map(lambda ep: self._start(ep, seed, tracer), starting),
                                 tracer)
                for ep in starting:
                    if ep.status == "running":
                        active.append(ep)
                    else:
                        self._finish(ep, tracer)
                        heapq.heappush(lanes, ep.lane)
                if not active:
                    continue
                if turns is None:  # decided once, when the first episodes have said how many turns they take
                    reuse = self.reuse_cache and hasattr(self.engine, "open_session") and any(ep.max_turns > 1 for ep in active)
                    turns = (_CachedTurns if reuse else _PrefilledTurns)(self, state, cap, sharding, prompts)
                with tracer.span("turn", turn_batch=batch_no, episodes=len(active), policy_version=policy_version):
                    g0 = tracer.now()
                    with tracer.span("generate", episodes=len(active), policy_version=policy_version):
                        with device():
                            # The first call samples with ``key`` itself: a single-turn episode is then
                            # exactly the plain rollout's completion.
                            turn_key = key if batch_no == 0 else jax.random.fold_in(key, batch_no)
                            outs = turns.generate(active, turn_key)
                    if host is not None:
                        host.settled()
                    g1 = tracer.now()
                    for ep in active:
                        tracer.complete(ep.lane, "generate", g0, g1, episode=ep.index, turn=ep.turns + 1,
                                        rows=turns.rows, prefill_tokens=turns.prefilled.get(ep.index, 0),
                                        policy_version=policy_version)
                    with tracer.span("environment", episodes=len(active)):
                        self._host_phase(host, active, lambda: host_map(lambda i: self._turn(active[i], *outs[i], tracer),
                                                                        range(len(active))), tracer)
                        turns.kept(active)
                        still = []
                        for ep in active:  # episode order, whatever order the workers finished in
                            if ep.status == "running":
                                still.append(ep)
                            else:
                                self._finish(ep, tracer)
                                heapq.heappush(lanes, ep.lane)
                        active = still
                batch_no += 1
        return self._fields(episodes)

    def _host_phase(self, host: Any, episodes: list[Episode], work: Callable[[], None], tracer: Tracer) -> None:
        """``work()`` (environment calls for ``episodes``) here, or on the
        leader of ``host`` with its episodes' new state copied here."""
        if host is None:
            work()
            return
        # What the episodes held before: the lists only grow, so only their new ends are sent.
        before = [{k: len(getattr(ep, k)) for k in _APPENDED} for ep in episodes]

        def run_and_dump() -> str:
            work()
            return json.dumps([{**{k: getattr(ep, k)[n[k]:] for k in _APPENDED}, **{k: getattr(ep, k) for k in _REPLACED}}
                               for ep, n in zip(episodes, before)])

        text = host.share(run_and_dump)
        if not host.is_leader:
            now, now_us = time.monotonic(), tracer.now()
            for ep, fields in zip(episodes, json.loads(text)):
                if not ep.started:
                    ep.started, ep.started_us = now, now_us
                for k in _APPENDED:
                    getattr(ep, k).extend(fields[k])
                for k in _REPLACED:
                    setattr(ep, k, fields[k])

    # -- one episode ------------------------------------------------------------------

    def _start(self, ep: Episode, seed: int, tracer: Tracer) -> None:
        ep.started, ep.started_us = time.monotonic(), tracer.now()
        ep_seed = int(np.random.SeedSequence([abs(int(seed)), ep.index]).generate_state(1)[0])
        context = EnvironmentContext(run_config=self.run_config, registry=self.registry, tokenizer=self.tokenizer,
                                     seed=ep_seed, episode=ep.index,
                                     span=lambda name, **args: tracer.lane_span(ep.lane, name, episode=ep.index, **args))
        try:
            ep.env = self.spec.factory(self.options, context=context)
            ep.max_turns = _limit(self.section.max_turns, getattr(ep.env, "max_turns", None))
            ep.max_tokens = _limit(self.max_tokens, getattr(ep.env, "max_tokens", None))
            with tracer.lane_span(ep.lane, "reset", episode=ep.index):
                observation = self._call(ep, ep.env.reset, ep.example)
            if not isinstance(observation, str):
                raise _Failure(f"reset returned {type(observation).__name__}, not the observation text")
            if not self._observe(ep, observation):
                ep.status = "truncated"
        except Exception as exc:  # noqa: BLE001 - an environment may raise anything; the episode fails, the run goes on
            self._fail(ep, exc)
        if ep.status != "running":
            self._ended(ep)

    def _turn(self, ep: Episode, tokens: list[int], logprobs: list[float], tracer: Tracer) -> None:
        ep.turns += 1
        ep.last_kept = 0
        try:
            text = self.tokenizer.decode(tokens)
            end_of = getattr(ep.env, "action_end", None)
            end = end_of(text) if end_of is not None else None
            if end is not None and end < len(text):
                n = _tokens_for(self.tokenizer, tokens, end)
                tokens, logprobs = tokens[:n], logprobs[:n]
            room = ep.max_tokens - len(ep.tokens)
            tokens, logprobs = tokens[:room], logprobs[:room]
            text = self.tokenizer.decode(tokens)
            ep.last_kept = len(tokens)
            ep.tokens += tokens
            ep.policy += [True] * len(tokens)
            ep.logprobs += [float(x) for x in logprobs]
            ep.actions.append(text)
            with tracer.lane_span(ep.lane, "step", episode=ep.index, turn=ep.turns):
                out = self._call(ep, ep.env.step, text)
            try:
                observation, reward, done = out
            except (TypeError, ValueError):
                raise _Failure(f"step returned {out!r}, not (observation, reward, done)") from None
            ep.reward += float(reward)
            fits = self._observe(ep, str(observation or ""))
        except Exception as exc:  # noqa: BLE001 - see _start
            self._fail(ep, exc)
            self._ended(ep)
            return
        if done:
            ep.status = "done"
        elif not fits or ep.turns >= ep.max_turns or len(ep.tokens) >= ep.max_tokens:
            ep.status = "truncated"
        if ep.status != "running":
            self._ended(ep)

    def _observe(self, ep: Episode, observation: str) -> bool:
        """Appends an observation's tokens (loss mask 0); False when it did not fit."""
        if not observation:
            return True
        ep.observations.append(observation)
        full = self.tokenizer.encode(observation)
        ids = full[:ep.max_tokens - len(ep.tokens)]
        ep.tokens += ids
        ep.policy += [False] * len(ids)
        ep.logprobs += [0.0] * len(ids)
        return len(ids) == len(full)

    def _call(self, ep: Episode, fn: Callable[[Any], Any], arg: Any) -> Any:
        """``fn(arg)``, within what is left of the episode's time limit (its
        environment time so far, not the time it waited for others)."""
        timeout = self.section.timeout_s
        start = time.monotonic()
        try:
            if timeout is None:
                return fn(arg)
            return call_with_timeout(lambda: fn(arg), timeout - ep.env_seconds, name=f"episode-{ep.index}")
        except CallTimeout:
            raise _Failure(f"timed out after {timeout:g} s in the environment") from None
        finally:
            ep.env_seconds += time.monotonic() - start

    def _fail(self, ep: Episode, exc: BaseException) -> None:
        ep.status = "failed"
        ep.error = str(exc) if isinstance(exc, _Failure) else f"{type(exc).__name__}: {exc}"

    def _ended(self, ep: Episode) -> None:
        """The environment's own numbers of an episode that just ended (on the
        thread that ended it, so a multi-process leader can share them)."""
        metrics = getattr(ep.env, "metrics", None)
        if callable(metrics):
            try:
                ep.metrics = {str(k): float(v) for k, v in dict(metrics()).items()}
            except Exception:  # noqa: BLE001 - diagnostics only; a broken one is left out
                ep.metrics = {}

    def _finish(self, ep: Episode, tracer: Tracer) -> None:
        ep.seconds = time.monotonic() - ep.started
        if ep.status == "failed":
            ep.reward = 0.0
        tracer.complete(ep.lane, "episode", ep.started_us, tracer.now(), episode=ep.index, status=ep.status,
                        turns=ep.turns, reward=ep.reward, tokens=len(ep.tokens), policy_tokens=ep.policy_tokens,
                        **({"error": ep.error} if ep.error else {}), **ep.metrics)
        ep.env = None  # an environment may hold resources; nothing needs it after the end

    # -- output -----------------------------------------------------------------------

    def _fields(self, episodes: list[Episode]) -> EpisodeBatch:
        n, t = len(episodes), self.max_tokens
        tokens = np.full((n, t), self.tokenizer.pad_id, np.int32)
        loss = np.zeros((n, t), bool)
        attention = np.zeros((n, t), bool)
        logprobs = np.zeros((n, t), np.float32)
        for i, ep in enumerate(episodes):
            k = len(ep.tokens)
            tokens[i, :k] = ep.tokens
            attention[i, :k] = True
            if ep.status != "failed":
                loss[i, :k] = ep.policy
                logprobs[i, :k] = ep.logprobs
        rewards = np.array([ep.reward for ep in episodes], np.float32)
        return EpisodeBatch(tokens=tokens, loss_mask=loss, attention_mask=attention, logprobs=logprobs,
                            rewards=rewards, episodes=episodes)


#: What a multi-process leader shares of each episode after its environment calls: the new
#: ends of the lists, and the rest whole.
_APPENDED = ("tokens", "policy", "logprobs", "actions", "observations")
_REPLACED = ("turns", "reward", "status", "error", "max_turns", "max_tokens", "last_kept", "env_seconds", "metrics")


def episode_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """Counts and per-episode means of a set of episodes: ``episodes``,
    ``episodes_failed``, ``episodes_truncated``, and ``episode/turns``,
    ``episode/reward``, ``episode/policy_tokens``, ``episode/env_tokens``,
    ``episode/seconds`` and each environment metric (``episode/tool_calls``,
    ...) averaged over the episodes that report it."""
    n = len(episodes)
    out: dict[str, float] = {
        "episodes": n,
        "episodes_failed": sum(ep.status == "failed" for ep in episodes),
        "episodes_truncated": sum(ep.status == "truncated" for ep in episodes),
    }
    if not n:
        return out
    out["episode/turns"] = float(np.mean([ep.turns for ep in episodes]))
    out["episode/reward"] = float(np.mean([ep.reward for ep in episodes]))
    out["episode/policy_tokens"] = float(np.mean([ep.policy_tokens for ep in episodes]))
    out["episode/env_tokens"] = float(np.mean([ep.env_tokens for ep in episodes]))
    out["episode/seconds"] = float(np.mean([ep.seconds for ep in episodes]))
    keys = dict.fromkeys(k for ep in episodes for k in ep.metrics)
    for k in keys:
        values = [ep.metrics[k] for ep in episodes if k in ep.metrics]
        out[f"episode/{k}"] = float(np.mean(values))
    return out


class _PrefilledTurns:
    """Each turn's generation call prefills every episode's whole context
    (for engines without cache sessions, and single-turn episodes)."""

    def __init__(self, runner: EpisodeRunner, state: Any, cap: int, sharding: Any, prompts: Sequence[Sequence[int]]):
        self.runner, self.state, self.cap, self.sharding = runner, state, cap, sharding
        self.rows = 0
        self.prefilled: dict[int, int] = {}

    def generate(self, active: list[Episode], key: Any) -> list[tuple[list[int], list[float]]]:
        self.rows = _row_bucket(len(active), self.cap)
        contexts = [ep.prompt + ep.tokens for ep in active]
        self.prefilled = {ep.index: len(c) for ep, c in zip(active, contexts)}
        self.runner.prefill_tokens += sum(self.prefilled.values())
        contexts += [contexts[0]] * (self.rows - len(contexts))
        tokens, mask = pad_prompts(contexts, self.runner.tokenizer.pad_id)
        gen = self.runner.engine.generate(self.state, tokens, mask, key, self.runner.params, sharding=self.sharding)
        return _rows_of(gen, range(len(active)))

    def kept(self, active: list[Episode]) -> None:
        return None


def chunk_bucket(width: int) -> int:
    from rlpipe.models.generation import chunk_bucket as bucket

    return bucket(width)


class _CachedTurns:
    """Generation calls on a :class:`~rlpipe.models.generation.CacheSession`:
    each episode keeps a row of the KV cache from turn to turn, so a turn
    prefills only what is new in its context (the environment's last
    observation; the whole prompt when the episode starts).  When the next
    call would not fit in the session's slots, or half of its rows are idle,
    a new session is opened, sized for the episodes in flight, and their
    contexts prefilled into it."""

    def __init__(self, runner: EpisodeRunner, state: Any, cap: int, sharding: Any, prompts: Sequence[Sequence[int]]):
        self.runner, self.state, self.cap, self.sharding = runner, state, cap, sharding
        longest = max((len(p) for p in prompts), default=1)
        # Room for every episode's whole context twice over, and one turn: a session holds
        # several turns before it is compacted.
        self.slots = 2 * chunk_bucket(longest + runner.max_tokens) + runner.params.max_new_tokens
        self.session: Any = None
        self.rows = 0
        self.row_of: dict[int, int] = {}
        self.cached = np.zeros((0,), np.int64)
        self.chunk = np.zeros((0,), np.int64)
        self.prefilled: dict[int, int] = {}

    def _open(self, active: list[Episode]) -> None:
        self.rows = _row_bucket(len(active), self.cap)
        self.session = None  # the old cache is freed before the new one is made
        self.session = self.runner.engine.open_session(self.state, self.rows, self.slots, sharding=self.sharding)
        self.runner.cache_sessions += 1
        self.row_of = {ep.index: r for r, ep in enumerate(active)}
        self.cached = np.zeros((self.rows,), np.int64)
        self.chunk = np.zeros((self.rows,), np.int64)

    def generate(self, active: list[Episode], key: Any) -> list[tuple[list[int], list[float]]]:
        params = self.runner.params
        # Also start over, smaller, once a session of half the rows would do: decode steps cost
        # in proportion to the rows.
        fresh = (self.session is None or len(active) > self.rows
                 or _row_bucket(len(active), self.cap) <= self.rows // 2)
        if not fresh:
            free = sorted(set(range(self.rows)) - set(self.row_of.values()))
            for ep in active:
                if ep.index not in self.row_of:  # a new episode takes a free row and starts over there
                    self.row_of[ep.index] = free.pop(0)
                    self.cached[self.row_of[ep.index]] = 0
            new = [len(ep.prompt) + len(ep.tokens) - self.cached[self.row_of[ep.index]] for ep in active]
            widest, longest = max(new), max(len(ep.prompt) + len(ep.tokens) for ep in active)
            # Start over when the call does not fit, or when most of the slots attention would read
            # are stale (rows refilled after their first episodes ended): a new session holds only
            # what the episodes in flight need.
            # (and when a row has nothing new, which kept() avoids unless a turn kept no token
            # and the environment answered with nothing: the row must be sampled from again)
            fresh = (not self.session.fits(int(widest), params) or min(new) <= 0
                     or self.session.write > 2 * chunk_bucket(longest + params.max_new_tokens))
        if fresh:
            self._open(active)
        reset = np.zeros((self.rows,), bool)
        chunks: list[list[int]] = [[] for _ in range(self.rows)]
        start = self.cached.copy()
        for ep in active:
            r = self.row_of[ep.index]
            reset[r] = fresh or self.cached[r] == 0
            context = ep.prompt + ep.tokens
            chunks[r] = context[int(self.cached[r]):]
        self.chunk = np.array([len(c) for c in chunks], np.int64)
        self.prefilled = {ep.index: len(chunks[self.row_of[ep.index]]) for ep in active}
        self.runner.prefill_tokens += int(self.chunk.sum())
        gen = self.runner.engine.extend(self.state, self.session, chunks, start, reset, key, params, sharding=self.sharding)
        return _rows_of(gen, [self.row_of[ep.index] for ep in active])

    def kept(self, active: list[Episode]) -> None:
        """After the environment steps: what each row keeps of its turn, and
        the rows of the episodes that ended freed."""
        kept = np.full((self.rows,), self.runner.params.max_new_tokens, np.int64)
        for ep in active:
            r = self.row_of[ep.index]
            k = ep.last_kept
            if ep.status == "running" and k > 0 and len(ep.prompt) + len(ep.tokens) == self.cached[r] + self.chunk[r] + k:
                # The environment added nothing after the turn: its last token is forgotten from the
                # cache and fed again, so the row has a chunk to sample after.
                k -= 1
            kept[r] = k
            self.cached[r] += self.chunk[r] + k
            if ep.status != "running":
                del self.row_of[ep.index]
        self.session.keep(kept)


def _rows_of(gen: Any, rows: Sequence[int]) -> list[tuple[list[int], list[float]]]:
    """The live tokens and their log-probs of ``rows`` of a generation (one transfer of each field)."""
    tokens, logprobs, mask = np.asarray(gen.tokens), np.asarray(gen.logprobs), np.asarray(gen.mask).astype(bool)
    return [(tokens[r][mask[r]].tolist(), logprobs[r][mask[r]].tolist()) for r in rows]


@contextlib.contextmanager
def _host_map(workers: int) -> Iterator[Callable[[Callable[[Any], Any], Sequence[Any]], None]]:
    """``host_map(fn, items)`` calls ``fn`` on every item, on up to ``workers``
    threads, and returns when all are done (``fn`` handles its own errors)."""
    if workers <= 1:
        def in_turn(fn: Callable[[Any], Any], items: Sequence[Any]) -> None:
            for item in items:
                fn(item)

        yield in_turn
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="environment") as pool:
        def at_once(fn: Callable[[Any], Any], items: Sequence[Any]) -> None:
            for _ in pool.map(fn, items):  # re-raises what fn raised
                pass

        yield at_once


def _limit(configured: int, own: Any) -> int:
    return int(configured) if own is None else int(min(configured, own))


def _row_bucket(n: int, cap: int) -> int:
    return min(max(1 << max(n - 1, 0).bit_length(), MIN_ROWS), max(cap, n))


def _tokens_for(tokenizer: Any, tokens: Sequence[int], chars: int) -> int:
    """The fewest leading ``tokens`` whose text is at least ``chars`` long."""
    for n in range(1, len(tokens) + 1):
        if len(tokenizer.decode(tokens[:n])) >= chars:
            return n
    return len(tokens)


__all__ = ["Episode", "EpisodeBatch", "EpisodeRunner", "StageTracer", "Tracer", "episode_metrics"]
