"""Helpers for testing rlpipe plugins (and rlpipe itself).

* :func:`fake_devices` — a device pool for placement tests, no JAX needed.
* :func:`register_plugin` — make a plugin object visible to every registry
  loaded in this process, for the duration of a ``with`` block.
* :func:`fake_distribution` — write an installed-looking distribution (a
  ``.dist-info`` with entry points) into a directory on ``sys.path``, so entry
  point discovery finds your plugin exactly as after ``pip install``.
* :class:`RecordingStage` — a pure-Python stage that records what it saw.

Example::

    from rlpipe.testing import fake_devices, register_plugin
    import my_plugin

    def test_my_policy_is_selectable():
        with register_plugin(my_plugin, name="mine"):
            reg = rlpipe.load_registry()
            assert "my-policy" in reg.policies
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlpipe.core.placement import DeviceInfo
from rlpipe.core.plugins import in_process_plugin
from rlpipe.core.stage import Batch, StageContext


def fake_devices(n: int, *, platform: str = "cpu", memory_bytes: int | None = None) -> list[DeviceInfo]:
    """``n`` devices with ids ``0..n-1``."""
    return [DeviceInfo(id=i, platform=platform, memory_bytes=memory_bytes) for i in range(n)]


@contextmanager
def register_plugin(plugin: Any, *, name: str, distribution: str | None = "test-plugin", version: str | None = "0.0") -> Iterator[None]:
    """Registers ``plugin`` (a module or object with hookimpls) for one ``with`` block."""
    with in_process_plugin(plugin, name=name, distribution=distribution, version=version):
        yield


def fake_distribution(site: str | Path, *, name: str, version: str, entry_points: Mapping[str, str]) -> Path:
    """Writes ``<site>/<name>-<version>.dist-info`` declaring ``entry_points`` in the
    ``rlpipe`` group.  Put ``site`` on ``sys.path`` (pytest: ``monkeypatch.syspath_prepend``)
    and ``importlib.metadata`` will find it like any installed package."""
    site = Path(site)
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[rlpipe]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return dist


class RecordingStage:
    """A stage that adds ``produces`` fields computed by ``fn`` and records every
    call (thread-safe) as ``(event, role, step, index)`` in ``log``.

    Args:
        role: the role it plays (for the log).
        produces: ``{field: fn(batch, context)}``.
        log: a shared list, so several stages' events interleave in one order.
        delay: seconds to sleep in each call (to make overlap observable).
        fail_at: ``(step, index)`` at which ``process`` raises.
    """

    def __init__(self, role: str, produces: Mapping[str, Callable[[Batch, StageContext], Any]] | None = None, *,
                 log: list | None = None, delay: float = 0.0, fail_at: tuple[int, int] | None = None):
        self.role = role
        self.produces = dict(produces or {})
        self.log = log if log is not None else []
        self.delay = delay
        self.fail_at = fail_at
        self._lock = threading.Lock()

    def _record(self, *event: Any) -> None:
        with self._lock:
            self.log.append(event)

    def process(self, batch: Batch, *, context: StageContext) -> Batch:
        import time

        self._record("process", self.role, context.step, context.index)
        if self.fail_at == (context.step, context.index):
            raise RuntimeError(f"{self.role} exploded")
        if self.delay:
            time.sleep(self.delay)
        return batch.add(**{f: fn(batch, context) for f, fn in self.produces.items()})

    def on_barrier(self, *, context: StageContext) -> None:
        self._record("barrier", self.role, context.step, None)

    def offload(self) -> None:
        self._record("offload", self.role, None, None)

    def onload(self) -> None:
        self._record("onload", self.role, None, None)
