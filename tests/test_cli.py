"""The introspection CLI: listings, plan (table and the --json contract), exit codes."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import EXAMPLES, ROOT

from rlpipe.cli.main import cli

PLAN_KEYS = {"devices", "policy", "mode", "roles", "boundaries"}
ROLE_KEYS = {"name", "devices", "mesh", "colocated_with", "offload", "memory_estimate_bytes"}


def run(*args):
    return CliRunner().invoke(cli, list(args))


def plan_json(*args):
    r = run("plan", "--json", *args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("rlpipe ")


def test_plan_json_follows_the_documented_schema_exactly():
    doc = plan_json("-c", str(EXAMPLES / "colocated_offload.yaml"))
    assert set(doc) == PLAN_KEYS
    assert doc["devices"] == list(range(8)) and doc["policy"] == "default"
    for role in doc["roles"]:
        assert set(role) == ROLE_KEYS
        assert set(role["mesh"]) == {"shape", "axes"}
        assert all(isinstance(i, int) for i in role["devices"])
    for b in doc["boundaries"]:
        assert set(b) == {"from", "to", "blocking"} and isinstance(b["blocking"], bool)


def roles_by_name(doc):
    return {r["name"]: r for r in doc["roles"]}


def test_plan_json_for_the_three_seed_configurations():
    off = plan_json("-c", str(EXAMPLES / "colocated_offload.yaml"))
    r = roles_by_name(off)
    assert off["mode"] == "colocated+offload"
    assert r["trainer"]["devices"] == r["rollout"]["devices"] == [0, 1, 2, 3]
    assert r["trainer"]["mesh"] == {"shape": [4, 1], "axes": ["fsdp", "tp"]}
    assert r["rollout"]["mesh"] == {"shape": [1, 4], "axes": ["fsdp", "tp"]}
    assert sorted(r["rollout"]["colocated_with"]) == ["reference", "reward", "trainer"]
    # every device role is offloaded; the reward role runs on the host and never is
    assert {x["name"]: x["offload"] for x in off["roles"]} == {"rollout": True, "reward": False, "reference": True, "trainer": True}
    assert off["boundaries"] == [
        {"from": "rollout", "to": "reward", "blocking": False},
        {"from": "rollout", "to": "reference", "blocking": True},
        {"from": "reward", "to": "trainer", "blocking": False},
        {"from": "reference", "to": "trainer", "blocking": True},
    ]

    on = plan_json("-c", str(EXAMPLES / "colocated.yaml"))
    r = roles_by_name(on)
    assert on["mode"] == "colocated" and r["rollout"]["mesh"]["shape"] == [1, 4]
    assert r["trainer"]["devices"] == r["rollout"]["devices"] == [0, 1, 2, 3]
    assert not any(b["blocking"] for b in on["boundaries"]) and not any(x["offload"] for x in on["roles"])

    dis = plan_json("-c", str(EXAMPLES / "disaggregated.yaml"))
    r = roles_by_name(dis)
    assert dis["mode"] == "disaggregated"
    assert r["trainer"]["devices"] == [0, 1, 2, 3] and r["rollout"]["devices"] == [4, 5, 6, 7]
    assert r["rollout"]["colocated_with"] == []
    assert not any(b["blocking"] for b in dis["boundaries"])


def test_plan_table_shows_devices_meshes_groups_and_blocking_edges():
    r = run("plan", "-c", str(EXAMPLES / "colocated_offload.yaml"))
    assert r.exit_code == 0
    out = r.stdout
    assert "mode: colocated+offload" in out and "devices: 8 (cpu)" in out
    assert "stages: rollout, reward, reference, trainer (in topological order)" in out
    # the last column is the per-device memory estimate (host roles have none)
    assert "rollout    0-3      [1, 4] (fsdp, tp)  reference, reward, trainer   yes        740.6 MiB" in out
    assert "reward     0-3      [4, 1] (fsdp, tp)  reference, rollout, trainer  host role  -" in out
    assert "trainer    0-3      [4, 1] (fsdp, tp)  reference, reward, rollout   yes        162.6 MiB" in out
    assert "rollout -> reward: streams items as they arrive" in out
    assert "rollout -> reference: blocks until the global-batch barrier" in out
    assert "reward -> trainer: streams items as they arrive" in out
    assert "reference -> trainer: blocks until the global-batch barrier" in out
    assert "devices [4, 5, 6, 7] are not used" in out


def test_plan_for_hypothetical_devices():
    doc = plan_json("--devices", "64", "--set", "roles.rollout.mesh={shape: [8, 4], axes: [dp, tp]}")
    r = roles_by_name(doc)
    assert doc["devices"] == list(range(64))
    assert r["rollout"]["devices"] == list(range(32)) and r["trainer"]["devices"] == list(range(32, 64))


def test_plan_errors_exit_2_with_one_line_per_problem_and_no_traceback():
    r = run("plan", "--set", "roles.trainer.mesh={shape: [16, 1], axes: [fsdp, tp]}")
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr == ("error: roles: the roles' meshes need 16 devices (trainer 16) but 8 exist; plan for them with "
                        "`rlpipe plan --devices 16`, or on the CPU fake them with "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=16\n")
    # ppo (GAE) needs the critic; a KL weight keeps the reference: both are in the run
    r = run("plan", "--set", "algorithm.name=ppo", "--set", "algorithm.options.kl_beta=0.04",
            "--set", "roles.reference.colocate_with=rolout", "--set", "roles.critic.colocate_with=critic")
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [
        "error: roles.reference.colocate_with: unknown role 'rolout' (did you mean 'rollout'?) (roles in this run: rollout, reward, reference, trainer, critic)",
        "error: roles.critic.colocate_with: a role cannot colocate with itself",
    ]


def test_selecting_a_plan_only_role_for_a_run_says_so():
    import types

    import attrs
    from helpers import config

    from rlpipe import (
        BuildContext,
        RoleConfig,
        RoleNotRunnableError,
        RoleSpec,
        build_stages,
        hookimpl,
    )
    from rlpipe.core.plugins import load_registry
    from rlpipe.runtime.planning import plan_run
    from rlpipe.testing import register_plugin

    @attrs.frozen(kw_only=True)
    class VerifierConfig(RoleConfig):
        pass

    spec = RoleSpec(name="verifier", description="d", config_type=VerifierConfig, consumes={"completion_tokens"},
                    produces={"verdict"}, unavailable="the verifier service is not wired up yet")
    with register_plugin(types.SimpleNamespace(rlpipe_roles=hookimpl(lambda: [spec])), name="verifier"):
        reg = load_registry(warn=lambda m: None)
    # every built-in role of the default and the ppo graphs has a stage
    for algo in ("grpo", "ppo"):
        assert all(s.factory is not None for s in plan_run(config(reg, {"algorithm": {"name": algo}}), reg).roles.values())
    planned = plan_run(config(reg, {"roles": {"verifier": {}}}), reg)
    with pytest.raises(RoleNotRunnableError) as e:
        build_stages(planned, context=BuildContext(run_config=planned.config, registry=reg))
    # one line per plan-only role, each with its reason
    assert e.value.lines() == ["roles.verifier: the verifier service is not wired up yet"]


def test_plan_prints_the_algorithms_role_changes_as_notes():
    # the default algorithm (grpo, KL beta 0.04) keeps the reference and needs no critic
    r = run("plan")
    assert r.exit_code == 0 and "note: reference" not in r.stdout and "note: critic" not in r.stdout
    r = run("plan", "--set", "roles.critic={}")
    assert r.exit_code == 0, r.stderr
    assert "stages: rollout, reward, reference, trainer (in topological order)" in r.stdout
    assert "note: critic is left out: algorithm 'grpo' does not use it" in r.stdout.splitlines()
    r = run("plan", "--set", "algorithm.name=ppo")
    assert r.exit_code == 0, r.stderr
    assert "stages: rollout, reward, critic, trainer (in topological order)" in r.stdout
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("note: ") and "algorithm" in ln] == [
        "note: reference is left out: algorithm 'ppo' does not use it",
        "note: critic is added with default settings: algorithm 'ppo' needs it",
    ]
    # --json stays the documented plan schema, notes and all left out
    assert set(plan_json("--set", "algorithm.name=ppo")) == PLAN_KEYS


def test_roles_list_table_and_json():
    r = run("roles", "list")
    assert r.exit_code == 0
    for name in ("rollout", "reward", "reference", "trainer", "critic"):
        assert name in r.stdout
    assert "[ref_logprobs]" in r.stdout
    entries = {e["name"]: e for e in json.loads(run("roles", "list", "--json").stdout)}
    assert entries["reference"]["produces"] == ["ref_logprobs"]
    assert entries["trainer"]["sink"] is True and "ref_logprobs" in entries["trainer"]["optional_consumes"]
    assert entries["rollout"]["distribution"] == "rlpipe"
    assert {n: e["status"] for n, e in entries.items()} == {
        "rollout": "active", "reference": "active", "reward": "active", "trainer": "active", "critic": "active",
        "reward_model": "active"}


def test_placements_list_table_and_json():
    r = run("placements", "list")
    assert r.exit_code == 0 and "colocate-all" in r.stdout
    entries = {e["name"]: e for e in json.loads(run("placements", "list", "--json").stdout)}
    assert set(entries) >= {"default", "colocate-all", "disaggregated"}
    assert entries["disaggregated"]["options"][0]["name"] == "groups"
    assert entries["disaggregated"]["options"][0]["default"][0] == {"roles": ["rollout"], "fraction": 0.5}


def test_plugins_list_json_shows_builtins_from_entry_points():
    entries = json.loads(run("plugins", "list", "--json").stdout)
    builtin = {e["name"]: e for e in entries if e["builtin"]}
    assert set(builtin) == {"roles", "placement", "engines", "rewards", "algorithms", "tasks", "environments", "tools"}
    assert all(e["status"] == "active" and e["distribution"] == "rlpipe" for e in builtin.values())


def test_json_output_is_the_only_thing_on_stdout():
    for args in (["roles", "list"], ["placements", "list"], ["plugins", "list"], ["plan"], ["config", "show"]):
        r = run(*args, "--json")
        assert r.exit_code == 0
        json.loads(r.stdout)


@pytest.mark.slow
def test_console_script_runs_as_a_subprocess():
    """The installed entry point, a real process: exit status and streams."""
    ok = subprocess.run([sys.executable, "-m", "rlpipe", "plan", "--json", "--devices", "2"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["devices"] == [0, 1]
    bad = subprocess.run([sys.executable, "-m", "rlpipe", "config", "validate", "--set", "train.steps=zero"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: train.steps: expected an int, got 'zero'"
    assert "Traceback" not in bad.stderr
