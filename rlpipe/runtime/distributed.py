"""Multi-process runs: ``jax.distributed`` set-up and the rules every process follows.

Every process of a run executes the same ``rlpipe train`` command.  After
:func:`initialize`, ``jax.devices()`` lists the devices of all processes, the
placement plans over all of them, and each stage's mesh may span several
processes.  JAX is multi-controller: a program whose devices belong to several
processes runs only when *every* one of those processes dispatches it, and
processes must dispatch such programs in the same order.  rlpipe's executor
runs one thread per stage, so that order is not given for free; this module
provides it, and the few primitives stages need when their devices are not all
local (docs/scaling.md has the whole execution model):

* :class:`RegionOrder`: process 0 decides the order of *global regions* (a
  stretch of device work, :func:`rlpipe.runtime.devices.on_devices`, whose
  devices span several processes); the other processes follow it, read from
  the coordination service's key-value store.
* :func:`put`: host arrays that are identical on every process onto any
  sharding (``jax.device_put`` would compare them across processes with a
  collective of its own, outside any order).
* :func:`to_host`: a program's result as numpy on every process that holds
  part of it.
* :func:`broadcast`: host arrays from one process to all (a collective over
  one device per process, bit-exact).
* :func:`share`: run device work where its mesh is and hand the host result
  to every process.
* :func:`transfer`: weights from one device group to another across processes.
* A watchdog: a process that dies or fails stops every other one within a
  bounded time, naming it.

With one process none of this is active and every function falls back to the
single-process behaviour.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from rlpipe.core.errors import UsageError

#: Key-value store prefix for everything rlpipe keeps in the coordination service.
_KV = "rlpipe"


class DistributedError(UsageError):
    """A multi-process set-up that cannot start: bad options, an unreachable
    coordinator, a port in use (exit 2)."""


@attrs.frozen(kw_only=True)
class DistributedOptions:
    """How this process joins a multi-process run.

    Attributes:
        coordinator: ``HOST:PORT`` of process 0's coordination service.
        num_processes: processes in the run.
        process_id: this process, ``0 .. num_processes - 1``.
        auto: let JAX detect the three above from the cluster environment
            (SLURM, Open MPI, TPU pod slices); explicit values still win.
        init_timeout_s: how long processes wait for each other at start-up.
        heartbeat_timeout_s: a process silent this long is lost; rlpipe's own
            watchdog reports it after half of it, before JAX aborts.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False
    init_timeout_s: int = 300
    heartbeat_timeout_s: int = 60

    @property
    def requested(self) -> bool:
        return self.auto or any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator {address!r}: expected HOST:PORT, e.g. 10.0.0.1:12345")
    return host, int(port)


def _check_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """Turns the failures JAX reports by aborting the process (a coordinator
    nobody listens on) or by an obscure RPC error (a port in use) into one line."""
    host, port = _split_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DistributedError(f"--coordinator {address}: cannot resolve host {host!r}: {exc.strerror}") from None
    if process_id == 0:
        # Process 0 runs the coordination service on every interface of that port.
        for family, _, _, _, sockaddr in infos[:1]:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                # As gRPC does: a port left in TIME_WAIT by an earlier run is free.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(sockaddr)
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE:
                        raise DistributedError(f"--coordinator {address}: port {port} is already in use on this "
                                               "host; choose a free port (every process must be given the same one)") from None
                    if exc.errno == errno.EADDRNOTAVAIL:
                        raise DistributedError(f"--coordinator {address}: {host} is not an address of this host; process 0 "
                                               "runs the coordinator, so the address must name process 0's host") from None
                    raise DistributedError(f"--coordinator {address}: cannot listen on it: {exc.strerror}") from None
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise DistributedError(f"--coordinator {address}: nobody is listening there after {timeout_s:g}s "
                                       f"({exc.strerror or exc}); start process 0 with the same --coordinator, "
                                       "or check the address") from None
            time.sleep(0.5)


def _enable_cpu_collectives() -> None:
    """Multi-process collectives on CPU need an implementation; gloo ships with jaxlib."""
    import jax

    try:
        if getattr(jax.config, "jax_cpu_collectives_implementation", None) in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # an older or newer jax without the option: its default applies
        pass


def _orbax_barriers_without_collectives() -> None:
    """orbax's default barrier is a device collective (``sync_global_devices``),
    dispatched from its own threads outside any order; its coordination-service
    barrier is not, so checkpoints cannot interleave with stage programs."""
    try:
        import orbax.checkpoint  # noqa: F401 - defines the flag
        from absl import flags

        name = "experimental_orbax_use_distributed_barrier"
        if name in flags.FLAGS:
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            flags.FLAGS[name].value = True
    except Exception:  # noqa: BLE001 - an orbax without the flag keeps its default
        pass


def _recoverable_tasks() -> None:
    """Without this, JAX aborts every process (``LOG(FATAL)``, no word of which
    one is gone) once any of them misses its heartbeats; rlpipe's watchdog
    names the lost process and stops the others itself.  The loss of process
    0, which hosts the coordination service, still ends the others at once."""
    import jax

    with contextlib.suppress(AttributeError, ValueError):
        jax.config.update("jax_enable_recoverability", True)


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001
        return False


# -- the session -------------------------------------------------------------------


class Session:
    """This process's membership in a multi-process run (see :func:`initialize`).

    Its watchdog thread beats in the coordination service's key-value store
    and reads the others' beats: when another process fails (it says so, see
    :meth:`fail`) or goes silent, this process prints one ``error:`` line
    naming it and exits with status 1, instead of waiting in a collective
    forever.  Process 0 hosts the coordination service, so it leaves last.
    """

    def __init__(self, client: Any, process_index: int, process_count: int, *, heartbeat_timeout_s: float):
        self.client = client
        self.process_index = process_index
        self.process_count = process_count
        self.order = RegionOrder(client, leader=process_index == 0)
        self.lost_after_s = max(2.0, heartbeat_timeout_s / 2)
        self._exit_code: int | None = None
        self._message = ""
        self._closing = False
        self._named = False  # the process that caused the stop was named already
        self._leaving = threading.Lock()
        self._notes: dict[int, str] = {}  # other processes that failed, left or are lost
        self._left: set[int] = set()
        self._lost: set[int] = set()  # other processes whose heartbeat stopped
        self._on_abort: list[Callable[[], None]] = []
        self._watchdog = threading.Thread(target=self._watch, name="rlpipe-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0

    def barrier(self, name: str, timeout_s: float = 600) -> None:
        """Waits until every process reached barrier ``name`` (names are single use)."""
        self.client.wait_at_barrier(f"{_KV}/barrier/{name}", int(timeout_s * 1000))

    def on_abort(self, fn: Callable[[], None]) -> None:
        """``fn`` runs (best effort) before the watchdog ends this process."""
        self._on_abort.append(fn)

    def fail(self, exit_code: int, message: str) -> None:
        """Tells the other processes this one failed, so they stop at once
        naming it, and makes this process leave with ``exit_code`` at exit
        without waiting at JAX's shutdown barrier for peers stuck in a
        collective with it.  Idempotent: the first failure is the one told."""
        if self._exit_code is not None:
            return
        self._exit_code, self._message = exit_code, message
        self.order.cancel()
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{_KV}/failed/{self.process_index}", message[:2000], allow_overwrite=True)
        # A thread of this process may sit in a collective no peer will join:
        # if the process has not ended by then, end it here.
        timer = threading.Timer(self.lost_after_s + 30, self._leave_now, args=(exit_code, message))
        timer.daemon = True
        timer.start()

    def exchange(self, name: str, value: str, timeout_s: float = 600) -> str:
        """Process 0's ``value`` for ``name``, on every process (process 0
        publishes its own; the others wait for it)."""
        key = f"{_KV}/exchange/{name}"
        if self.is_primary:
            self.client.key_value_set(key, value)
            return value
        return self.client.blocking_key_value_get(key, int(timeout_s * 1000))

    def agree(self, name: str, value: str, *, wait_s: float = 0) -> bool | None:
        """Whether this process's ``value`` for ``name`` equals process 0's (which
        process 0 publishes here); ``None`` while process 0 has not published
        it within ``wait_s``."""
        key = f"{_KV}/agree/{name}"
        if self.is_primary:
            self.client.key_value_set(key, value, allow_overwrite=True)
            return True
        try:
            if wait_s > 0:
                return self.client.blocking_key_value_get(key, int(wait_s * 1000)) == value
            return self.client.key_value_try_get(key) == value
        except Exception:  # noqa: BLE001 - NOT_FOUND / DEADLINE_EXCEEDED: not published
            return None

    # -- stopping together ---------------------------------------------------------

    def request_stop(self) -> None:
        """Asks process 0 to stop the run (a signal reached this process)."""
        self.client.key_value_set(f"{_KV}/stop-request/{self.process_index}", "1", allow_overwrite=True)

    def stop_requested(self) -> bool:
        return bool(self.client.key_value_dir_get(f"{_KV}/stop-request/"))

    def announce_stop(self, step: int) -> None:
        """Process 0: every process stops after ``step``."""
        self.client.key_value_set(f"{_KV}/stop-at", str(step), allow_overwrite=True)

    def stop_step(self) -> int | None:
        """The step process 0 announced every process stops after, if any."""
        try:
            return int(self.client.key_value_try_get(f"{_KV}/stop-at"))
        except Exception:  # noqa: BLE001 - not announced (NOT_FOUND)
            return None

    def close(self) -> None:
        """Leaves the run after success, once every process has finished.

        Process 0 hosts the coordination service: if it went first, the
        others' JAX clients would abort on losing it.  So the others
        disconnect first and process 0 waits for them."""
        import jax

        self.client.wait_at_barrier(f"{_KV}/barrier/finished", 3600 * 1000)
        self._closing = True
        self.order.cancel()
        me = self.process_index
        if me != 0:
            self.client.key_value_set(f"{_KV}/closed/{me}", "1")
            jax.distributed.shutdown()
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if len(self.client.key_value_dir_get(f"{_KV}/closed/")) >= self.process_count - 1:
                    break
            time.sleep(0.1)
        time.sleep(1.0)  # their disconnects are in flight
        jax.distributed.shutdown()

    # -- leaving -------------------------------------------------------------------

    def _leave_now(self, exit_code: int, message: str | None = None) -> None:
        with self._leaving:
            if message:
                sys.stderr.write(f"error: {message}\n")
            self.leave(exit_code)

    def leave(self, exit_code: int) -> None:
        """Ends this process with ``exit_code`` (never returns).  Before that:
        says so to the others and waits (briefly) until each of them has
        failed, left or is known lost; a failed process then also names the
        first other process that failed or is lost (the likely cause)."""
        self.order.cancel()
        me = self.process_index
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{_KV}/left/{me}", str(exit_code), allow_overwrite=True)
        deadline = time.monotonic() + self.lost_after_s + 2
        others = set(range(self.process_count)) - {me}

        def settled() -> bool:
            # Process 0 hosts the coordination service: the others' JAX clients
            # abort when it goes, so it waits until they have left (or died).
            return others <= (self._left | self._lost if me == 0 else self._left | set(self._notes))

        while time.monotonic() < deadline and not settled():
            try:
                for key, message in self.client.key_value_dir_get(f"{_KV}/failed/"):
                    p = int(key.rsplit("/", 1)[-1])
                    if p != me:
                        self._notes.setdefault(p, f"process {p} of {self.process_count} failed: {message}")
                self._left |= {int(k.rsplit("/", 1)[-1]) for k, _ in self.client.key_value_dir_get(f"{_KV}/left/")}
            except Exception:  # noqa: BLE001 - the coordinator is gone: nobody left to wait for
                break
            time.sleep(0.1)
        if self._notes and not self._named:
            sys.stderr.write(f"error: {self._notes[min(self._notes)]}\n")
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(exit_code)

    def _abort(self, message: str) -> None:
        """Another process failed or is lost: stop this one, naming it."""
        with self._leaving:
            if self._closing or self._exit_code is not None:
                return
            self._exit_code = 1
            self.order.cancel()
            sys.stderr.write(f"error: {message}; stopping process {self.process_index} of {self.process_count}\n")
            sys.stderr.flush()
            for fn in self._on_abort:
                with contextlib.suppress(Exception):
                    fn()
            self._named = True
            self.leave(1)

    # -- watchdog ------------------------------------------------------------------

    def _watch(self) -> None:
        me, n = self.process_index, self.process_count
        seen: dict[int, tuple[str, float]] = {}
        beat = 0
        while not self._closing:
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"{_KV}/alive/{me}", str(beat), allow_overwrite=True)
                failed = {int(k.rsplit("/", 1)[-1]): v for k, v in self.client.key_value_dir_get(f"{_KV}/failed/")}
                left = {int(k.rsplit("/", 1)[-1]) for k, _ in self.client.key_value_dir_get(f"{_KV}/left/")}
                alive = {int(k.rsplit("/", 1)[-1]): v for k, v in self.client.key_value_dir_get(f"{_KV}/alive/")}
            except Exception as exc:  # noqa: BLE001 - the coordination service (on process 0) is gone
                if self._closing:
                    return
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                self._notes.setdefault(0, f"process 0 (the coordinator) is lost: the coordination service stopped "
                                          f"answering ({reason})")
                self._left.add(0)
                self._abort(self._notes[0])
                return
            self._left |= left - {me}
            for p, message in sorted(failed.items()):
                if p != me:
                    self._notes.setdefault(p, f"process {p} of {n} failed: {message}")
            for p in range(n):
                if p == me or p in self._left or p not in alive:
                    continue  # not beating yet: JAX's start-up barrier covers that
                last = seen.get(p)
                if last is None or last[0] != alive[p]:
                    seen[p] = (alive[p], now)
                elif now - last[1] > self.lost_after_s:
                    self._lost.add(p)
                    self._notes.setdefault(p, f"process {p} of {n} is lost: no heartbeat for {now - last[1]:.0f}s "
                                              "(it died or hangs)")
            if self._notes and self._exit_code is None:
                p = min(self._notes)
                self._abort(self._notes[p])
            time.sleep(0.5)


_SESSION: Session | None = None


def current() -> Session | None:
    """The session of a multi-process run, or ``None`` (one process)."""
    return _SESSION


def process_index() -> int:
    return _SESSION.process_index if _SESSION is not None else 0


def process_count() -> int:
    return _SESSION.process_count if _SESSION is not None else 1


def initialize(options: DistributedOptions) -> Session | None:
    """Joins the multi-process run ``options`` describes; call before any other
    JAX call.  Returns ``None`` (and does nothing) for a single process.

    Raises:
        DistributedError: incomplete options, an unreachable coordinator, a
            port in use, a cluster environment JAX does not detect.
    """
    global _SESSION
    if not options.requested:
        return None
    if _SESSION is not None:
        raise DistributedError("the distributed runtime is already initialised in this process")
    explicit = (options.coordinator, options.num_processes, options.process_id)
    if not options.auto and None in explicit:
        missing = [flag for flag, v in zip(("--coordinator", "--num-processes", "--process-id"), explicit) if v is None]
        raise DistributedError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                               f"(or --distributed auto); missing {', '.join(missing)}")
    if options.num_processes is not None and options.num_processes < 1:
        raise DistributedError(f"--num-processes {options.num_processes}: must be at least 1")
    if options.num_processes == 1 and not options.auto:
        return None  # one process: nothing to coordinate
    if options.process_id is not None and options.num_processes is not None \
            and not 0 <= options.process_id < options.num_processes:
        raise DistributedError(f"--process-id {options.process_id}: must be in 0..{options.num_processes - 1}")
    if _backend_started():
        raise DistributedError("JAX was already used in this process; the distributed runtime must start first")
    if options.coordinator is not None and options.process_id is not None:
        _check_coordinator(options.coordinator, options.process_id, options.init_timeout_s)

    import jax

    _enable_cpu_collectives()
    _orbax_barriers_without_collectives()
    _recoverable_tasks()
    kwargs = dict(initialization_timeout=int(options.init_timeout_s),
                  heartbeat_timeout_seconds=int(options.heartbeat_timeout_s),
                  # A process waits this long at exit for the others; a failed
                  # run does not wait at all (Session.fail).
                  shutdown_timeout_seconds=int(max(options.heartbeat_timeout_s, 30)))
    try:
        jax.distributed.initialize(options.coordinator, options.num_processes, options.process_id, **kwargs)
    except ValueError as exc:
        if options.auto:
            raise DistributedError("--distributed auto: no cluster environment detected (SLURM, Open MPI, TPU pod "
                                   f"slice): {str(exc).splitlines()[0].rstrip('.')}; give --coordinator, --num-processes and "
                                   "--process-id instead") from None
        raise DistributedError(f"cannot start the distributed runtime: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - a JAX runtime error, reported in one line
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Failed to start RPC server" in text and options.coordinator:
            text = f"cannot listen on {options.coordinator} (port in use?)"
        raise DistributedError(f"cannot start the distributed runtime: {text}") from None
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return None
    _SESSION = Session(client, index, count, heartbeat_timeout_s=options.heartbeat_timeout_s)
    from rlpipe.runtime import devices

    devices.set_region_order(_SESSION.order)
    atexit.register(_exit_without_barrier)  # runs before JAX's own atexit shutdown (LIFO)
    return _SESSION


def _exit_without_barrier() -> None:
    """A failed process must not wait at JAX's shutdown barrier for peers that
    are stuck in a collective with it: it leaves with its status."""
    s = _SESSION
    if s is not None and s._exit_code is not None:  # noqa: SLF001
        s.leave(s._exit_code)  # noqa: SLF001


# -- the order of global regions -----------------------------------------------------


class RegionOrder:
    """Makes every process enter *global regions* in one order: process 0's.

    A global region is a stretch of device work (``on_devices``) whose devices
    belong to several processes; its programs are collectives across them, so
    each process must dispatch them in the same order, although each
    process's stage threads reach them in an order timing decides.  Process 0
    (the leader) enters regions as its threads come and appends each region's
    label to a log in the coordination service; the other processes (followers)
    let a thread enter a region only when its label is next in the log.

    A label is ``<thread name>#<n>``: the n-th global region of that thread.
    Every process runs the same stage threads, named after their roles, doing
    the same work on the same data, so labels name the same region everywhere.

    A thread must not wait for its turn while it holds devices (a region
    inside a region over other devices): the thread whose turn it is might
    need them.  Stages therefore enter global regions at their top level.
    """

    def __init__(self, client: Any, *, leader: bool, poll_ms: int = 200):
        self.client = client
        self.leader = leader
        self._poll_ms = poll_ms
        self._cond = threading.Condition()
        self._counts: dict[str, int] = {}
        self._next = 0  # the next log position to enter (followers) / to write (leader)
        self._log: list[str] = []  # labels read so far (followers)
        self._reading = False
        self._cancelled = False

    def cancel(self) -> None:
        """Makes every waiting and later turn raise (the run is stopping)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def _label(self) -> str:
        name = threading.current_thread().name
        with self._cond:
            n = self._counts.get(name, 0)
            self._counts[name] = n + 1
        return f"{name}#{n}"

    @contextlib.contextmanager
    def region(self, devices: Sequence[Any], acquire: Callable[[], None]) -> Iterator[None]:
        """Calls ``acquire()`` (which takes the devices' local locks) at this
        region's turn, then runs the block."""
        if len({getattr(d, "process_index", 0) for d in devices}) <= 1:
            acquire()  # one process's devices: only that process dispatches
            yield
            return
        label = self._label()
        if self.leader:
            acquire()
            with self._cond:
                if self._cancelled:
                    raise RegionCancelled("the run is stopping")
                position = self._next
                self._next += 1
                self.client.key_value_set(f"{_KV}/order/{position}", label)
        else:
            position = self._wait_turn(label)
            try:
                acquire()
            finally:
                with self._cond:
                    self._next = position + 1
                    self._cond.notify_all()
        yield

    def _wait_turn(self, label: str) -> int:
        with self._cond:
            while True:
                if self._cancelled:
                    raise RegionCancelled("the run is stopping")
                if len(self._log) > self._next:
                    if self._log[self._next] == label:
                        return self._next
                    self._cond.wait(timeout=self._poll_ms / 1000)
                    continue
                if self._reading:
                    self._cond.wait(timeout=self._poll_ms / 1000)
                    continue
                self._reading = True
                position = len(self._log)
                self._cond.release()
                try:
                    try:
                        value = self.client.blocking_key_value_get(f"{_KV}/order/{position}", self._poll_ms)
                    except Exception:  # noqa: BLE001 - not written yet: poll again
                        value = None
                finally:
                    self._cond.acquire()
                    self._reading = False
                if value is not None and len(self._log) == position:
                    self._log.append(value)
                self._cond.notify_all()


class RegionCancelled(RuntimeError):
    """A thread waited for a global region's turn while the run was stopping."""


# -- arrays across processes ---------------------------------------------------------


def processes_of(devices: Any) -> frozenset[int]:
    """Process indices of ``devices`` (a mesh, a sharding or an iterable of devices)."""
    if hasattr(devices, "axis_names") and hasattr(devices, "devices"):
        devices = devices.devices.flat
    elif hasattr(devices, "device_set"):
        devices = devices.device_set
    return frozenset(getattr(d, "process_index", 0) for d in devices)


class HostLeader:
    """Host work that one process of a device group does for all of them.

    The processes of a multi-process device group run the same device
    programs (SPMD); host work between them that must happen once — an
    agentic rollout's environment calls, which may have side effects or
    answer differently each time — is done by the group's first process, the
    *leader*, which publishes its result as text through the coordination
    service; the others wait for it (:meth:`share`) and acknowledge it.

    Keys are numbered in order.  The leader deletes a key once every other
    process has acknowledged it (checked in :meth:`settled`, without
    waiting), so the service holds only the last few.  A process waits for
    the leader as long as ``timeout_s`` (a day by default: the leader's
    environment time is unbounded unless the environment's ``timeout_s``
    bounds it; a process that dies is caught by the session's heartbeat).
    """

    def __init__(self, devices: Any, name: str, *, timeout_s: float = 86400):
        procs = processes_of(devices)
        self.leader = min(procs)
        self.followers = len(procs) - 1
        self.is_leader = process_index() == self.leader
        self.name, self.timeout_s = name, timeout_s
        self._count = 0
        self._published: list[str] = []

    def share(self, value: Callable[[], str]) -> str:
        """The leader's ``value()`` on every process of the group (only the leader calls it)."""
        s = _SESSION
        assert s is not None
        key = f"{_KV}/host/{self.name}/{self._count}"
        self._count += 1
        if self.is_leader:
            text = value()
            s.client.key_value_set(key, text)
            self._published.append(key)
            return text
        text = s.client.blocking_key_value_get(key, int(self.timeout_s * 1000))
        s.client.key_value_set(f"{key}.ack/{s.process_index}", "")
        return text

    def settled(self) -> None:
        """Deletes what every other process has read (the leader; a no-op elsewhere)."""
        s = _SESSION
        if s is None or not self.is_leader:
            return
        pending = []
        for key in self._published:
            if len(s.client.key_value_dir_get(f"{key}.ack/")) >= self.followers:
                s.client.key_value_delete(f"{key}.ack")  # the directory of acknowledgements
                s.client.key_value_delete(key)
            else:
                pending.append(key)
        self._published = pending


def host_leader(devices: Any, name: str) -> HostLeader | None:
    """A :class:`HostLeader` for ``devices`` when they span several processes, else ``None``."""
    if _SESSION is None or len(processes_of(devices)) < 2:
        return None
    return HostLeader(devices, name)


def owns(devices: Any) -> bool:
    """Whether this process holds at least one of ``devices`` (a mesh, ...)."""
    return process_index() in processes_of(devices)


def put(tree: Any, sharding: Any) -> Any:
    """Host arrays (identical on every process) as global arrays on ``sharding``.

    ``jax.device_put`` onto a sharding that spans processes first checks, with
    a collective over all devices, that every process passed equal values; that
    collective would run outside :class:`RegionOrder` (and costs a round trip).
    rlpipe's host data is deterministic (the same seed, the same prompts), so
    each process builds its own shards from its copy instead.
    """
    import jax

    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x: Any) -> Any:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index], dtype=x.dtype)

    return jax.tree_util.tree_map(one, tree)


def to_host(tree: Any) -> Any:
    """A pytree of (global) arrays as numpy.

    Arrays this process holds entirely, or a replica of, are read directly;
    an array split over several processes is first gathered (a collective: call
    inside the region that computed it)."""
    import jax

    def one(x: Any) -> np.ndarray:
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = getattr(x.sharding, "mesh", None)
        if mesh is None:
            raise ValueError(f"cannot gather an array with sharding {x.sharding} to the host")
        replicated = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
        return np.asarray(replicated.addressable_data(0))

    return jax.tree_util.tree_map(one, tree)


def _process_mesh():
    """One device per process, in process order: the cheapest mesh every process is on."""
    import jax
    from jax.sharding import AxisType, Mesh

    first: dict[int, Any] = {}
    for d in jax.devices():
        first.setdefault(d.process_index, d)
    return Mesh(np.array([first[p] for p in sorted(first)]), ("process",), axis_types=(AxisType.Explicit,))


_BROADCAST_BYTES = 256 << 20  # one program moves at most this much (bounds the device copy)


def broadcast(value: Mapping[str, np.ndarray] | None, source: int, *,
              like: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """``value`` (host arrays by name) of process ``source``, on every process.

    Other processes pass ``None``; they learn shapes and dtypes from ``like``
    (objects with ``shape`` and ``dtype``) or else from the key-value store.
    The data moves as a sum over one device per process in which only the
    source contributes, on the arrays' bits, so values arrive bit-exact
    (``-0.0`` and NaN payloads too).  A global region: all processes take part.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    s = _SESSION
    if s is None:
        assert value is not None
        return {k: np.asarray(v) for k, v in value.items()}
    me = s.process_index
    mesh = _process_mesh()
    from rlpipe.runtime.devices import on_devices

    with on_devices(mesh.devices.flat):
        if like is None:
            key = f"{_KV}/broadcast/{_per_thread('broadcast')}"
            if me == source:
                layout = [[k, list(np.shape(v)), np.asarray(v).dtype.str] for k, v in value.items()]
                s.client.key_value_set(key, json.dumps(layout))
            else:
                layout = json.loads(s.client.blocking_key_value_get(key, 600_000))
            specs = {k: (tuple(shape), np.dtype(dtype)) for k, shape, dtype in layout}
        else:
            specs = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in like.items()}
        words = {}
        for k, (shape, dtype) in specs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            word = np.uint32 if nbytes % 4 == 0 else np.uint16 if nbytes % 2 == 0 else np.uint8
            if me == source:
                flat = np.ascontiguousarray(np.asarray(value[k], dtype=dtype)).reshape(-1)
                words[k] = flat.view(np.uint8).view(word)
            else:
                words[k] = np.zeros(nbytes // np.dtype(word).itemsize, word)
        sharded = NamedSharding(mesh, PartitionSpec("process"))
        fn = _psum_fn(mesh)
        out: dict[str, np.ndarray] = {}
        for batch in _batches(words, _BROADCAST_BYTES):
            arrays = {k: jax.make_array_from_process_local_data(sharded, words[k][None], (len(mesh.devices),) + words[k].shape)
                      for k in batch}
            summed = fn(arrays)
            for k in batch:
                shape, dtype = specs[k]
                out[k] = np.asarray(summed[k].addressable_data(0)).view(dtype).reshape(shape).copy()
        return out


_COUNTS: dict[tuple[str, str], int] = {}
_COUNTS_LOCK = threading.Lock()


def _per_thread(kind: str) -> str:
    """``<thread name>#<n>``: the n-th ``kind`` of this thread, which names the
    same call on every process (the same threads make the same calls)."""
    name = threading.current_thread().name
    with _COUNTS_LOCK:
        n = _COUNTS.get((kind, name), 0)
        _COUNTS[(kind, name)] = n + 1
    return f"{name}#{n}"


def _batches(words: Mapping[str, np.ndarray], limit: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for k, w in words.items():
        if out[-1] and size + w.nbytes > limit:
            out.append([])
            size = 0
        out[-1].append(k)
        size += w.nbytes
    return [b for b in out if b]


_PSUM: dict[Any, Any] = {}


def _psum_fn(mesh: Any) -> Callable[[Any], Any]:
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if mesh not in _PSUM:
        summed = jax.shard_map(lambda t: jax.tree_util.tree_map(lambda a: jax.lax.psum(a[0], "process"), t),
                               mesh=mesh, in_specs=PartitionSpec("process"), out_specs=PartitionSpec())
        _PSUM[mesh] = jax.jit(summed, out_shardings=NamedSharding(mesh, PartitionSpec()))
    return _PSUM[mesh]


def share(devices: Any, compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``compute()`` (device work on ``devices``, returning host arrays by name)
    where those devices are, its result on every process.

    Processes that hold none of ``devices`` skip ``compute`` and receive the
    result from the first process that does.  When every process holds some
    of them, everybody computed it and nothing moves.
    """
    procs = processes_of(devices)
    if _SESSION is None or len(procs) == _SESSION.process_count:
        return dict(compute())
    value = dict(compute()) if _SESSION.process_index in procs else None
    return broadcast(value, min(procs))


def _devices_of(leaves: Sequence[Any]) -> list[Any]:
    return [d for x in leaves for d in x.sharding.device_set]


def _remote(shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
    """An array placed on other processes' devices only: this process holds no shard."""
    import jax

    def never(index: Any) -> np.ndarray:
        raise AssertionError("no local shard expected")

    return jax.make_array_from_callback(shape, sharding, never, dtype=dtype)


def crosses_processes(*groups: Any) -> bool:
    """Whether the union of device ``groups`` belongs to more than one process."""
    procs: set[int] = set()
    for g in groups:
        procs |= processes_of(g)
    return len(procs) > 1


def transfer(source: Any, target_shardings: Any, dtype: Any = None) -> Any:
    """Weight sync between device groups when the processes differ (the
    trainer's devices on one process, the rollout's on another).

    XLA:CPU (and GPU without a cross-host transfer backend) cannot
    ``jax.device_put`` between devices of different processes, and a jitted
    program cannot take inputs on one group and put outputs on another.  So
    the source's first process reads the values (gathering them if the source
    group spans processes), :func:`broadcast` hands them to every process, and
    each process places its shards of the target; processes outside the target
    group get arrays with no local shards, as for any remote placement.
    Every process must call it (it is a global region).
    """
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten(source)
    shards = jax.tree_util.tree_leaves(target_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    src_procs = frozenset().union(*(processes_of(x.sharding) for x in leaves)) if leaves else frozenset()
    if not crosses_processes(_devices_of(leaves), [d for s in shards for d in s.device_set]):
        # Both groups on one process: that process moves the arrays itself; the
        # others only need the arrays' global form (no local shards, no work).
        if owns([d for s in shards for d in s.device_set]):
            moved = jax.device_put(source, target_shardings)
            return moved if dtype is None else jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x.astype(dtype), t),
                                                       out_shardings=target_shardings)(moved)
        return jax.tree_util.tree_unflatten(treedef, [_remote(x.shape, dtype or x.dtype, s) for x, s in zip(leaves, shards)])
    origin = min(src_procs)
    like = {str(i): jax.ShapeDtypeStruct(x.shape, x.dtype) for i, x in enumerate(leaves)}
    value = None
    if len(src_procs) > 1:
        from rlpipe.runtime.devices import on_devices

        devices = {d for x in leaves for d in x.sharding.device_set}
        with on_devices(sorted(devices, key=lambda d: d.id)):  # gathering is a collective among the source's processes
            fetched = to_host(leaves) if process_index() in src_procs else None
        if process_index() == origin:
            value = {str(i): v for i, v in enumerate(fetched)}
    elif process_index() == origin:
        value = {str(i): np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}
    host = broadcast(value, origin, like=like)
    target = jnp.dtype(dtype) if dtype is not None else None
    out = [put(host[str(i)] if target is None else host[str(i)].astype(target), s) for i, s in enumerate(shards)]
    return jax.tree_util.tree_unflatten(treedef, out)
