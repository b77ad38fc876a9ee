"""Start-up time of the ``rlpipe`` command: what a user waits for before anything happens.

    python benchmarks/startup.py                   # the work tree; median of 5 runs per command
    python benchmarks/startup.py --rev HEAD~1      # another revision, exported to a temporary folder
    python benchmarks/startup.py --repeats 9 --json

Each command runs as a fresh ``python -m rlpipe ...`` subprocess with the
package under test first on ``PYTHONPATH`` (the work tree, or ``git archive``
of ``--rev``; entry points come from the installed distribution), after one
untimed run that writes the bytecode caches.  Measurements, one per command:

| name | what | ceiling |
|---|---|---|
| ``startup_time`` | median wall time of the subprocess, s (``min_s``, ``max_s``, ``runs``, and ``cpu_s``: its median user + system CPU time, steadier on a busy machine) | – |
| ``startup_heavy_imports`` | how many of jax, flax, optax, orbax the command imports (0 is the target) | – |

The listings need only the plugins' specs, so none of them should load
jax, flax or optax (``tests/test_startup.py`` asserts that; this script
measures what it buys).  Shared machines are noisy: compare revisions in
one session, on one machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from results import Sink, log, record, stdout_sink, table

ROOT = Path(__file__).resolve().parents[1]

#: The commands measured, as argument lists of ``rlpipe``.
COMMANDS: tuple[tuple[str, ...], ...] = (("--version",), ("--help",), ("roles", "list"), ("plugins", "list"))

#: Modules a listing has no use for; each costs from a tenth of a second to a second to import.
HEAVY = ("jax", "flax", "optax", "orbax")

#: Runs ``rlpipe`` in-process and reports, on stderr, which of HEAVY it imported.
_PROBE = """\
import sys
from rlpipe.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
finally:
    sys.stdout.flush()
    print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)
"""


def package_root(rev: str | None, tmp: str) -> Path:
    """The folder whose ``rlpipe/`` is measured: the work tree, or ``rev`` exported into ``tmp``."""
    if rev is None:
        return ROOT
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "rlpipe"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    return Path(tmp)


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(argv: Sequence[str], root: Path, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of ``argv``."""
    cpu, t = _cpu_s(), time.perf_counter()
    # In ``root``: ``python -m`` and ``-c`` put the current folder first on sys.path.
    subprocess.run(argv, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t, _cpu_s() - cpu


def heavy_imports(command: Sequence[str], root: Path, env: dict[str, str]) -> list[str]:
    """Which of :data:`HEAVY` ``rlpipe <command>`` imports."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *command], cwd=root, env=env, check=True,
                         capture_output=True, text=True).stderr
    line = next(x for x in reversed(out.splitlines()) if x.startswith("HEAVY="))
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def measure(*, rev: str | None = None, commands: Sequence[Sequence[str]] = COMMANDS, repeats: int = 5,
            emit: Sink | None = None) -> list[dict[str, Any]]:
    emit = emit or stdout_sink()
    out = []
    with tempfile.TemporaryDirectory(prefix="rlpipe-startup-") as tmp:
        root = package_root(rev, tmp)
        env = _env(root)
        where = {"rev": rev or "work tree", "python": sys.executable}
        for command in commands:
            argv = [sys.executable, "-m", "rlpipe", *command]
            _run(argv, root, env)  # writes the bytecode caches
            runs = [_run(argv, root, env) for _ in range(repeats)]
            times = [wall for wall, _ in runs]
            cpu = statistics.median(c for _, c in runs)
            shown = "rlpipe " + " ".join(command)
            log(f"{shown}: median {statistics.median(times):.3f} s wall, {cpu:.3f} s CPU over {repeats} runs")
            out.append(emit(record("startup_time", statistics.median(times), "s", command=shown, runs=repeats,
                                   min_s=min(times), max_s=max(times), cpu_s=cpu, **where)))
            heavy = heavy_imports(command, root, env)
            out.append(emit(record("startup_heavy_imports", len(heavy), "modules", command=shown, modules=heavy,
                                   **where)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", help="a git revision (default: the work tree)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per command (default 5)")
    ap.add_argument("--json", action="store_true", help="JSON lines on stdout (the table goes to stderr)")
    args = ap.parse_args(argv)
    records = measure(rev=args.rev, repeats=args.repeats, emit=stdout_sink() if args.json else Sink())
    table(records, labels=("command", "rev"), out=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
