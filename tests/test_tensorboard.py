"""TensorBoardSink: metrics rows become TensorBoard scalars (the ``tensorboard`` extra)."""

import struct
import sys

import pytest

from rlpipe.core.errors import ConfigError
from rlpipe.runtime.tensorboard import TensorBoardSink


def read_scalars(log_dir):
    """(tag, step, value) from the TFRecord event files under ``log_dir``."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack_from("<Q", data, at)
            record = data[at + 12: at + 12 + n]  # length, its crc, the record, its crc
            at += 12 + n + 4
            event = event_pb2.Event.FromString(record)
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_each_numeric_key_becomes_a_scalar_at_the_rows_step(tmp_path):
    pytest.importorskip("tensorboardX")
    with TensorBoardSink(tmp_path / "tb") as sink:
        sink.write({"step": 0, "reward/mean": 0.25, "loss": 1.5, "policy_version": 1, "note": "x", "flag": True,
                    "kl": float("nan")})
        sink.write({"step": 1, "reward/mean": 0.5, "loss": 1.0, "policy_version": 2})
    scalars = read_scalars(tmp_path / "tb")
    assert sorted(scalars) == [("loss", 0, 1.5), ("loss", 1, 1.0), ("policy_version", 0, 1.0), ("policy_version", 1, 2.0),
                               ("reward/mean", 0, 0.25), ("reward/mean", 1, 0.5)]


def test_rows_are_on_disk_before_close(tmp_path):
    pytest.importorskip("tensorboardX")
    sink = TensorBoardSink(tmp_path / "tb")
    sink.write({"step": 3, "loss": 2.0})
    assert read_scalars(tmp_path / "tb") == [("loss", 3, 2.0)]
    sink.close()


def test_without_the_extra_the_error_says_what_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "tensorboardX"] or ["tensorboardX"]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as info:
        TensorBoardSink(tmp_path / "tb")
    (line,) = info.value.lines()
    assert line.startswith("telemetry.tensorboard: ") and "pip install 'rlpipe[tensorboard]'" in line
