"""Multi-process runs on ``jax.distributed``, on loopback: 2 processes × 2 fake CPU devices.

Every test starts real processes (``python -m rlpipe train ...``) in their own
process group, with a hard timeout, and kills the groups when it ends, passed
or not.  The processes share a JAX compilation cache, so the runs after the
first compile little.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SMALL = ["--set", "train.prompts_per_item=2", "--set", "train.items_per_step=2",
         "--set", "roles.rollout.max_new_tokens=2", "--set", "roles.rollout.num_generations=4",
         "--set", "roles.trainer.micro_batch_size=4", "--set", "roles.trainer.num_iterations=1",
         "--set", "checkpoint.every=1", "--set", "checkpoint.keep=10"]
#: trainer on process 0's two devices, rollout on process 1's, asynchronous
#: (no reference: the colocated test covers it, and each role costs compile time)
DISAGGREGATED = ["--set", "roles.trainer.mesh={shape: [2, 1], axes: [fsdp, tp]}",
                 "--set", "roles.rollout.mesh={shape: [2, 1], axes: [fsdp, tp]}",
                 "--set", "train.max_staleness=1", "--set", "roles.reference=null",
                 "--set", "algorithm.options.kl_beta=0"]
EXACT = ("step", "loss", "reward/mean", "kl", "grad_norm", "policy_version", "staleness_mean")
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """CI's persistent compilation cache if there is one, else one for this module."""
    configured = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("jax-cache")


def environment(cache: Path, devices: int = 2) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLPIPE_", "XLA_FLAGS"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONUNBUFFERED="1")
    return env


class Processes:
    """Processes started in their own process groups; :meth:`kill` ends every group."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, argv: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def wait(self, timeout_s: float = TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"processes still running after {timeout_s}s:\n{self.output()}")
        return [p.returncode for p in self.procs]

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in self.logs if log.exists())

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=10)


@contextlib.contextmanager
def processes(tmp: Path):
    group = Processes(tmp)
    try:
        yield group
    finally:
        group.kill()


def train_argv(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "rlpipe", "train", "--run-dir", str(run_dir), "-q", *SMALL, *args]


def run_processes(tmp: Path, cache: Path, run_dir: Path, *args: str, n: int = 2) -> tuple[list[int], str]:
    """Runs ``rlpipe train`` as ``n`` processes on loopback; returns exit codes and logs."""
    port = free_port()
    with processes(tmp) as group:
        for i in range(n):
            group.start(train_argv(run_dir, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                                   "--process-id", str(i), "--heartbeat-timeout", "20", *args),
                        environment(cache), f"{run_dir.name}-p{i}")
        codes = group.wait()
        return codes, group.output()


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def spans(path: Path) -> tuple[set[int], set[tuple[str, str, int]]]:
    doc = json.loads(path.read_text())
    track = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"}
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    return {e["pid"] for e in doc["traceEvents"]}, {(track[e["tid"]], e["name"], e["args"].get("step")) for e in xs}


# -- (a) colocated over all four devices ----------------------------------------------


def test_colocated_run_spans_both_processes(tmp_path, cache_dir):
    run = tmp_path / "run"
    codes, logs = run_processes(tmp_path, cache_dir, run, "--steps", "1")
    assert codes == [0, 0], logs
    plan = json.loads((run / "plan.json").read_text())
    assert len(plan["devices"]) == 4
    assert all(r["devices"] == plan["devices"] for r in plan["roles"]), plan  # every role on all 4 devices
    assert [r["step"] for r in rows(run)] == [0]  # written once, by process 0
    assert rows(run)[0]["policy_version"] == 1 and np.isfinite(rows(run)[0]["loss"])
    pids0, spans0 = spans(run / "trace.json")
    pids1, spans1 = spans(run / "trace.1.json")
    assert (pids0, pids1) == ({0}, {1})
    assert {("rollout", "generate", 0), ("reference", "logprobs", 0), ("trainer", "train", 0)} <= spans0
    assert spans0 == spans1  # both processes did the same work (SPMD)
    assert (run / "checkpoints" / "0").is_dir()
    assert "process 0" not in logs and "error" not in logs


AGENTIC = ["--set", "task.name=calculator", "--set", "roles.reference=null", "--set", "algorithm.options.kl_beta=0",
           "--set", "roles.rollout.max_new_tokens=16",
           "--set", "roles.rollout.environment={name: tool, max_turns: 2, max_turn_tokens: 6, "
                    "options: {parser: gsm8k, describe_tools: false}}"]


def lane_spans(path: Path) -> list[tuple[str, dict]]:
    doc = json.loads(path.read_text())
    track = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["ph"] == "M"}
    return [(e["name"], e["args"]) for e in doc["traceEvents"]
            if e["ph"] == "X" and track[e["tid"]].startswith("rollout/episodes ")]


def test_an_agentic_rollout_across_processes_runs_its_environments_once(tmp_path, cache_dir):
    """The rollout's mesh spans both processes: both generate every turn, only
    process 0 calls the environments, and both record the same episodes."""
    run = tmp_path / "run"
    codes, logs = run_processes(tmp_path, cache_dir, run, "--steps", "1", *AGENTIC)
    assert codes == [0, 0], logs
    row = rows(run)[0]
    assert row["rollout/episodes"] == 16 and row["rollout/episodes_failed"] == 0, row
    lanes = {0: lane_spans(run / "trace.json"), 1: lane_spans(run / "trace.1.json")}
    kinds = {p: {name for name, _ in spans} for p, spans in lanes.items()}
    assert {"episode", "reset", "generate", "step"} <= kinds[0]
    assert {"episode", "generate"} <= kinds[1] and not kinds[1] & {"reset", "step", "tool"}  # no environment here
    episodes = {p: sorted((a["index"], a["episode"], a["status"], a["turns"], a["reward"]) for name, a in spans
                          if name == "episode") for p, spans in lanes.items()}
    assert episodes[0] == episodes[1] and len(episodes[0]) == 16


# -- (b) disaggregated across processes, (c) resume on 2 and on 1 process ---------------------


@pytest.fixture(scope="module")
def disaggregated(tmp_path_factory, cache_dir):
    """A 2-step asynchronous run, trainer on process 0's devices, rollout on process 1's."""
    tmp = tmp_path_factory.mktemp("disaggregated")
    run = tmp / "run"
    codes, logs = run_processes(tmp, cache_dir, run, "--steps", "2", *DISAGGREGATED)
    return run, codes, logs


def test_disaggregated_run_syncs_weights_across_processes(disaggregated):
    run, codes, logs = disaggregated
    assert codes == [0, 0], logs
    plan = json.loads((run / "plan.json").read_text())
    roles = {r["name"]: r["devices"] for r in plan["roles"]}
    assert roles["trainer"] == plan["devices"][:2] and roles["rollout"] == plan["devices"][2:], plan
    assert plan["mode"] == "disaggregated"
    assert [(r["step"], r["policy_version"]) for r in rows(run)] == [(0, 1), (1, 2)]
    # With a lag of 1 and checkpoints, the rollout (process 1) generated step 2
    # with version 1, which the trainer (process 0) sent it after step 0.
    meta = json.loads((run / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert meta["pending_steps"] == [2]
    _, spans1 = spans(run / "trace.1.json")
    assert {("trainer", "weight_sync", 0), ("rollout", "generate", 2)} <= spans1


def pending(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "pending")
    # A nested tree (checkpoint format 2): compared leaf by leaf, keyed by path.
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def test_resume_on_two_processes_and_on_one_match(disaggregated, tmp_path, cache_dir):
    run, codes, logs = disaggregated
    assert codes == [0, 0], logs
    two, one = tmp_path / "two", tmp_path / "one"
    shutil.copytree(run, two)
    shutil.copytree(run, one)
    codes, logs = run_processes(tmp_path, cache_dir, two, "--steps", "3")
    assert codes == [0, 0], logs
    assert "resuming from the checkpoint of step 1" in logs
    # The same checkpoint on one process with all four devices.
    with processes(tmp_path) as group:
        group.start(train_argv(one, "--steps", "3"), environment(cache_dir, devices=4), "one")
        assert group.wait() == [0], group.output()
    a, b = rows(two), rows(one)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
    assert [{k: r.get(k) for k in EXACT} for r in a] == [{k: r.get(k) for k in EXACT} for r in b]
    # Step 3, generated after the resume with the weights of step 2: sent across
    # processes in one run, moved between devices of one process in the other.
    x, y = pending(two, 2), pending(one, 2)
    assert x.keys() == y.keys() and x
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -- the primitives, directly --------------------------------------------------------------

WORKER = textwrap.dedent('''
    import sys, threading, random, time
    import numpy as np
    from rlpipe.runtime import distributed
    me = int(sys.argv[1])
    session = distributed.initialize(distributed.DistributedOptions(
        coordinator=sys.argv[2], num_processes=2, process_id=me, heartbeat_timeout_s=20, init_timeout_s=60))
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, AxisType
    from rlpipe.runtime.devices import on_devices
    from rlpipe.runtime import weights
    devs = jax.devices()
    axes = dict(axis_types=(AxisType.Auto, AxisType.Auto))
    mine = Mesh(np.array(devs[:2]).reshape(2, 1), ("fsdp", "tp"), **axes)     # process 0's devices
    theirs = Mesh(np.array(devs[2:]).reshape(1, 2), ("fsdp", "tp"), **axes)   # process 1's
    everyone = Mesh(np.array(devs).reshape(4, 1), ("fsdp", "tp"), **axes)

    # broadcast: bit-exact, from process 1
    x = np.array([-0.0, np.nan, 1.5, -3.25], np.float32)
    got = distributed.broadcast({"x": x, "b": np.array([True, False])} if me == 1 else None, 1)
    assert got["x"].tobytes() == x.tobytes() and got["b"].tolist() == [True, False], got

    # weight sync from process 0's mesh to process 1's, with a cast to bfloat16
    src = jax.jit(lambda: jnp.arange(32, dtype=jnp.float32).reshape(8, 4) / 3,
                  out_shardings=NamedSharding(mine, P("fsdp")))()
    out = weights.sync({"w": src}, {"w": NamedSharding(theirs, P(None, "tp"))}, dtype=jnp.bfloat16)["w"]
    want = (np.arange(32, dtype=np.float32).reshape(8, 4) / 3).astype(jnp.bfloat16)
    if me == 1:
        assert np.asarray(jax.device_get(out)).tobytes() == want.tobytes()
    else:
        assert not out.addressable_shards

    # two threads whose global programs reach each process in a different order
    # (paired with the other thread's program, each process would add up different data)
    rows = {k: distributed.put(np.arange(8, dtype=np.float32).reshape(4, 2) * k, NamedSharding(everyone, P("fsdp")))
            for k in (1, 2)}
    total = jax.jit(lambda a: a.sum())
    results = {}
    def work(name, k):
        rng = random.Random(me * 100 + k)
        for i in range(6):
            time.sleep(rng.random() * 0.05)
            with on_devices(everyone):
                results[(name, i)] = float(distributed.to_host(total(rows[k])))
    threads = [threading.Thread(target=work, args=(f"t{k}", k), name=f"t{k}") for k in (1, 2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert all(not t.is_alive() for t in threads), "deadlock"
    assert results == {(f"t{k}", i): 28.0 * k for k in (1, 2) for i in range(6)}, results
    session.close()
    print("ok", me)
''')


def test_primitives_across_two_processes(tmp_path, cache_dir):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    with processes(tmp_path) as group:
        for i in range(2):
            group.start([sys.executable, str(script), str(i), f"127.0.0.1:{port}"], environment(cache_dir), f"w{i}")
        assert group.wait(120) == [0, 0], group.output()
        assert "ok 0" in group.output() and "ok 1" in group.output()


# -- faults ---------------------------------------------------------------------------------


def test_a_lost_process_stops_the_others_naming_it(tmp_path, cache_dir):
    port = free_port()
    run = tmp_path / "run"
    with processes(tmp_path) as group:
        args = ("--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--heartbeat-timeout", "6", "--steps", "5")
        survivor = group.start(train_argv(run, *args, "--process-id", "0"), environment(cache_dir), "p0")
        victim = group.start(train_argv(run, *args, "--process-id", "1"), environment(cache_dir), "p1")
        deadline = time.monotonic() + 120
        while "training 5 steps" not in group.logs[1].read_text():
            assert victim.poll() is None and time.monotonic() < deadline, group.output()
            time.sleep(0.2)
        time.sleep(2)
        os.killpg(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        survivor.wait(timeout=60)
        assert time.monotonic() - killed < 30
        out = group.logs[0].read_text()
        assert survivor.returncode == 1, out
        assert "error: process 1 of 2 is lost" in out
        assert "Traceback" not in out


def test_an_unreachable_coordinator_is_one_line_and_exit_2(tmp_path, cache_dir):
    with processes(tmp_path) as group:
        group.start(train_argv(tmp_path / "run", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2",
                               "--process-id", "1", "--init-timeout", "2"), environment(cache_dir), "p1")
        assert group.wait(60) == [2]
        lines = group.logs[0].read_text().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --coordinator 127.0.0.1:"), lines
        assert "nobody is listening" in lines[0]


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path, cache_dir):
    with socket.socket() as taken, processes(tmp_path) as group:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        group.start(train_argv(tmp_path / "run", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", "0"), environment(cache_dir), "p0")
        assert group.wait(60) == [2]
        assert group.logs[0].read_text().strip() == (f"error: --coordinator 127.0.0.1:{port}: port {port} is already in "
                                                     "use on this host; choose a free port (every process must be given "
                                                     "the same one)")
