"""Memory estimates of the built-in roles, device capacity, the `auto` policy,
and what planning does when a role does not fit."""

import json

import attrs
import jax
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import config

from rlpipe import (
    MemoryEstimate,
    MeshSpec,
    PlacementError,
    PluginError,
    RoleConfig,
    RoleSpec,
)
from rlpipe.cli.main import cli
from rlpipe.core.memory import device_capacity, format_bytes
from rlpipe.models import memory
from rlpipe.models.config import PRESETS
from rlpipe.runtime.planning import memory_budget, plan_run, role_specs
from rlpipe.testing import fake_devices, register_plugin

GIB = 1 << 30

# Small, round shapes for hand computation: prompts padded to 16, 16 new tokens
# (sequences of 32), 2 prompts x 4 generations in flight, micro-batches of 4 rows.
SMALL = {
    "placement": {"assumed_prompt_tokens": 10},
    "train": {"prompts_per_item": 2},
    "roles": {"rollout": {"num_generations": 4, "max_new_tokens": 16},
              "reference": {"micro_batch_size": 4},
              "trainer": {"micro_batch_size": 4}},
}

# The tiny preset: vocab 128, hidden 64, intermediate 192, 2 layers, 4 heads and
# 2 kv heads of width 16, untied embeddings, no biases.
TINY_PER_LAYER = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 192 + 2 * 64   # q k v o, mlp, 2 norms
TINY_PARAMS = 2 * TINY_PER_LAYER + 2 * 128 * 64 + 64                              # + embed, lm_head, final norm
TINY_NORMS = 5 * 64                                                                 # replicated on any mesh
# Activations of the tiny preset in fp32 (the formulas of rlpipe.models.memory; at these
# sizes one attention block and one logit chunk hold every position).  Per token
# (h + (H + 2K)d) * 4 + 4I = (64 + 8 * 16) * 4 + 4 * 192 = 1536 bytes; one fp32 score
# array r * H * s * t * 4; logits (and their exponentials) 2 * r * positions * V * 4.
TINY_TOKEN = 1536
TINY_SCORES = lambda r, s, t: r * 4 * s * t * 4
# One layer's working set, for r rows, s tokens, t key slots: without a cache (t == s)
# 4 x tokens + 2.5 x scores, with a cache (prefill, t > s) 2 x tokens + 2 x scores.
TINY_LAYER = lambda r, s, t: (4 * r * s * TINY_TOKEN + 5 * TINY_SCORES(r, s, t) // 2 if t == s
                              else 2 * r * s * TINY_TOKEN + 2 * TINY_SCORES(r, s, t))
# Training without remat: each of the 2 layers keeps 4 x tokens and 3.5 x scores (one
# attention block: not rematerialised); then the logits and the head's fp32 gradient.
TINY_TRAIN_BODY = lambda r, s: 2 * (4 * r * s * TINY_TOKEN + 7 * TINY_SCORES(r, s, s) // 2)
# Logits only at the c completion positions (default: every position).
TINY_TRAIN = lambda r, s, c=None: TINY_TRAIN_BODY(r, s) + 2 * r * (s if c is None else c) * 128 * 4 + 128 * 64 * 4


def estimates(registry, data, n=1, shape=None, axes=("fsdp", "tp")):
    """Each role's estimate on an ``n``-device mesh (default ``[n, 1]``)."""
    cfg = config(registry, data)
    specs = role_specs(cfg, registry)
    budget = memory_budget(cfg, specs, fake_devices(n))
    mesh = MeshSpec(shape or (n, 1), axes)
    return {name: budget.estimate(name, mesh) for name in specs}


def with_capacity(data, capacity_bytes, policy=None):
    out = {**data, "placement": {**data.get("placement", {}), "device_memory_gib": capacity_bytes / GIB}}
    if policy:
        out["placement"]["policy"] = policy
    return out


# -- the arithmetic, against hand-computed numbers ----------------------------------------


def test_tiny_parameter_count_matches_the_model_config():
    assert TINY_PARAMS == 115_008 == PRESETS["tiny"].num_params()
    assert sum(int(np.prod(s)) for _, s in memory.decoder_parameters(PRESETS["tiny"])) == TINY_PARAMS


def test_qwen_parameter_count_and_bf16_bytes():
    qwen = PRESETS["qwen2.5-0.5b"]
    params = sum(int(np.prod(s)) for _, s in memory.decoder_parameters(qwen))
    assert params == qwen.num_params() == 494_032_768  # Qwen2.5-0.5B's published count (tied embeddings)
    assert memory.decoder_parameter_bytes(qwen, MeshSpec((1, 1), ("fsdp", "tp")), 2) == 988_065_536
    # every matrix has a hidden (896) dimension, which 8 divides; 24*2+1 norms of 896 stay whole
    norms = 49 * 896
    biases = 24 * (896 + 2 * 128)  # q/k/v biases are split over tp only, and tp is 1 here
    assert memory.decoder_parameter_bytes(qwen, MeshSpec((8, 1), ("fsdp", "tp")), 2) == \
        2 * ((params - norms - biases) // 8 + norms + biases)


def test_trainer_estimate_on_one_device(registry):
    est = estimates(registry, SMALL)["trainer"]
    p = TINY_PARAMS * 4
    assert est == MemoryEstimate(parameters=p, optimizer_state=2 * p, gradients=p, kv_cache=0,
                                 activations=TINY_TRAIN(4, 32, 16))
    assert est.total == 3_970_048


def test_trainer_estimate_on_four_devices_divides_parameters_and_rows(registry):
    est = estimates(registry, SMALL, n=4)["trainer"]
    p = ((TINY_PARAMS - TINY_NORMS) // 4 + TINY_NORMS) * 4
    # a micro-batch of 4 rows is split over fsdp=4: one row per device
    assert est == MemoryEstimate(parameters=p, optimizer_state=2 * p, gradients=p, kv_cache=0,
                                 activations=TINY_TRAIN(1, 32, 16))
    assert est.total == 1_020_928
    # tensor parallelism shards parameters the same, but rows are not split over tp
    tp = estimates(registry, SMALL, n=4, shape=(1, 4))["trainer"]
    assert tp.parameters == p and tp.activations == estimates(registry, SMALL)["trainer"].activations


def test_rollout_estimate_counts_the_kv_cache_of_the_rows_in_flight(registry):
    one, four = estimates(registry, SMALL)["rollout"], estimates(registry, SMALL, n=4)["rollout"]
    rows, slots = 2 * 4, 16 + 16
    kv = rows * 2 * 2 * 2 * 16 * slots * 4  # rows x layers x (k, v) x kv_heads x head_dim x slots x fp32
    prefill = TINY_LAYER(rows, 16, slots) + 2 * rows * 1 * 128 * 4  # one layer at a time, last position's logits
    assert one == MemoryEstimate(parameters=TINY_PARAMS * 4, kv_cache=kv, activations=prefill)
    # Data-parallel inference: fsdp=4 splits the 8 rows (cache and activations) 2 per device.
    assert four == MemoryEstimate(parameters=((TINY_PARAMS - TINY_NORMS) // 4 + TINY_NORMS) * 4, kv_cache=kv // 4,
                                  activations=TINY_LAYER(2, 16, slots) + 2 * 2 * 1 * 128 * 4)
    # Rows that fsdp does not divide are padded: 8 rows on fsdp=3 hold 3 per device; tp does not split rows.
    three = estimates(registry, SMALL, n=3)["rollout"]
    assert three.kv_cache == kv // rows * 3
    tp = estimates(registry, SMALL, n=4, shape=(1, 4))["rollout"]
    assert (tp.kv_cache, tp.activations) == (kv, prefill)


def test_reference_and_critic_estimates(registry):
    est = estimates(registry, {**SMALL, "algorithm": {"name": "ppo"}, "roles": {**SMALL["roles"], "critic": {"micro_batch_size": 4}}})
    assert est["reference"] == MemoryEstimate(parameters=TINY_PARAMS * 4,
                                              activations=TINY_LAYER(4, 32, 32) + 2 * 4 * 16 * 128 * 4)  # logits at the completion
    # Its micro-batch of 4 rows split over fsdp=4: one row per device.
    assert estimates(registry, SMALL, n=4)["reference"].activations == TINY_LAYER(1, 32, 32) + 2 * 1 * 16 * 128 * 4
    head = (64 + 1) * 4
    p = TINY_PARAMS * 4 + head
    assert est["critic"] == MemoryEstimate(parameters=p, optimizer_state=2 * p, gradients=p,
                                           activations=TINY_TRAIN_BODY(4, 32))  # a value per token: no vocab logits


def test_bfloat16_compute_halves_inference_copies_not_the_trainers_masters_and_sgd_keeps_no_optimizer_state(registry):
    f32 = estimates(registry, SMALL)
    bf16 = estimates(registry, {**SMALL, "model": {"compute_dtype": "bfloat16"}})
    # float32 master parameters, moments and gradients whatever the compute dtype
    assert bf16["trainer"].parameters == f32["trainer"].parameters
    assert bf16["trainer"].optimizer_state == f32["trainer"].optimizer_state
    assert bf16["trainer"].activations < f32["trainer"].activations
    for role in ("rollout", "reference"):
        assert bf16[role].parameters * 2 == f32[role].parameters
    sgd = estimates(registry, {**SMALL, "roles": {**SMALL["roles"], "trainer": {"optimizer": "sgd", "micro_batch_size": 4}}})
    assert sgd["trainer"].optimizer_state == 0


def test_host_roles_have_no_estimate(registry):
    assert estimates(registry, SMALL)["reward"] is None


@pytest.mark.parametrize("shape", [(4, 1), (2, 2), (1, 4)])
def test_parameter_bytes_match_the_shards_jax_lays_out(shape):
    """Independent check: the tiny model created sharded on a real (fake-CPU)
    mesh holds exactly the estimated bytes on each device."""
    from jax.sharding import Mesh

    from rlpipe.models.loading import init_sharded

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(shape), ("fsdp", "tp"))
    model = init_sharded(PRESETS["tiny"], mesh, seed=0)
    from flax import nnx

    leaves = jax.tree_util.tree_leaves(nnx.state(model))
    per_device = {d: 0 for d in mesh.devices.flat}
    for leaf in leaves:
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    want = memory.decoder_parameter_bytes(PRESETS["tiny"], MeshSpec(shape, ("fsdp", "tp")), 4)
    assert set(per_device.values()) == {want}


def test_a_task_prompt_limit_replaces_the_assumed_prompt_length(registry):
    from rlpipe.runtime.run_config import TaskSection

    if "max_prompt_tokens" not in attrs.fields_dict(TaskSection):
        pytest.skip("task.max_prompt_tokens is not in this tree")
    base = estimates(registry, SMALL)
    limited = estimates(registry, {**SMALL, "placement": {"assumed_prompt_tokens": 4000}, "task": {"max_prompt_tokens": 9}})
    assert limited == base  # 9 and 10 both pad to the 16-token bucket; 4000 is not used


def test_prompt_bucket_is_the_engines_bucket():
    from rlpipe.models.generation import bucket_length

    assert [memory.prompt_bucket(n) for n in range(1, 600)] == [bucket_length(n) for n in range(1, 600)]


def test_a_checkpoint_path_is_estimated_from_its_config_json(registry, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["qwen2.5-0.5b"].to_hf()))
    by_path = estimates(registry, {**SMALL, "model": {"path": str(tmp_path), "dtype": "bfloat16"}})
    by_preset = estimates(registry, {**SMALL, "model": {"preset": "qwen2.5-0.5b", "dtype": "bfloat16"}})
    assert by_path == by_preset and by_path["trainer"].parameters == 2 * 988_065_536  # float32 masters
    assert by_path["rollout"].parameters == 988_065_536  # bfloat16 copies
    missing = estimates(registry, {**SMALL, "model": {"path": str(tmp_path / "elsewhere")}})
    assert missing["trainer"] is None  # planning for another machine: unknown, not an error


# -- capacity --------------------------------------------------------------------------


def test_capacity_comes_from_the_devices_or_the_config():
    assert device_capacity(fake_devices(2, platform="gpu", memory_bytes=80 * GIB)).bytes == 80 * GIB
    configured = device_capacity(fake_devices(2, platform="gpu", memory_bytes=80 * GIB), 16)
    assert configured.bytes == 16 * GIB and "placement.device_memory_gib" in configured.describe()
    cpu = device_capacity(fake_devices(2))
    assert cpu.bytes is None and "unknown" in cpu.describe() and "cpu" in cpu.describe()


def test_plan_fills_estimates_of_device_roles_on_their_placed_mesh(registry):
    planned = plan_run(config(registry, SMALL), registry, fake_devices(4))
    by_name = {r.name: r for r in planned.plan.roles}
    assert by_name["trainer"].memory_estimate_bytes == 1_020_928
    assert by_name["reward"].memory_estimate_bytes is None
    assert planned.memory["trainer"].total == 1_020_928 and planned.capacity.bytes is None


# -- a role that does not fit ---------------------------------------------------------------


def test_a_role_larger_than_a_device_is_a_placement_error_with_any_policy(registry):
    need = estimates(registry, SMALL, n=8)["trainer"].total
    for policy in ("default", "colocate-all"):
        with pytest.raises(PlacementError) as exc:
            plan_run(config(registry, with_capacity(SMALL, need - 1, policy)), registry, fake_devices(8))
        problems = {p.path: p.message for p in exc.value.problems}
        assert "roles.trainer" in problems
        msg = problems["roles.trainer"]
        assert "\n" not in msg
        assert f"needs an estimated {format_bytes(need)} per device" in msg
        assert f"a device holds {format_bytes(need - 1)}" in msg
        assert "micro_batch_size" in msg and "bfloat16" in msg


def test_roles_that_fit_alone_but_not_together_get_a_note(registry):
    est = estimates(registry, SMALL, n=8)
    alone = max(e.total for e in est.values() if e)
    together = sum(e.total for e in est.values() if e)
    planned = plan_run(config(registry, with_capacity(SMALL, alone + 1024)), registry, fake_devices(8))
    assert alone < together
    [note] = [n for n in planned.plan.notes if "at once" in n]
    assert note.startswith("devices 0-7: rollout + reference + trainer need an estimated")
    assert "placement.offload=true" in note
    # taking turns, the same roles fit: no note
    offloaded = plan_run(config(registry, with_capacity({**SMALL, "placement": {**SMALL["placement"], "offload": True}}, alone + 1024)),
                         registry, fake_devices(8))
    assert not [n for n in offloaded.plan.notes if "at once" in n]


def test_train_with_a_model_that_does_not_fit_exits_2_naming_the_role(tmp_path):
    r = CliRunner().invoke(cli, ["train", "--run-dir", str(tmp_path / "run"), "--set", "placement.device_memory_gib=0.00001"])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines and all("needs an estimated" in ln and "a device holds 10.5 KiB" in ln for ln in lines)
    assert any(ln.startswith("error: roles.trainer: ") for ln in lines)


# -- the auto policy ------------------------------------------------------------------------


def auto(registry, data, capacity_bytes=None, n=8):
    data = with_capacity(data, capacity_bytes, "auto") if capacity_bytes else {**data, "placement": {**data.get("placement", {}), "policy": "auto"}}
    return plan_run(config(registry, data), registry, fake_devices(n)).plan


def test_auto_without_known_capacity_colocates_and_says_capacity_is_unknown(registry):
    p = auto(registry, SMALL)
    assert (p.policy, p.mode) == ("auto", "colocated")
    assert p.notes[0].startswith("auto: colocated — device memory is unknown")


def test_auto_colocates_when_everything_fits_at_once(registry):
    p = auto(registry, SMALL, 80 * GIB)
    assert (p.policy, p.mode) == ("auto", "colocated")
    assert not any(r.offload for r in p.roles)
    assert p.notes[0].startswith("auto: colocated — rollout + reference + trainer need ")
    assert p.notes[0].endswith("of 80.0 GiB per device")


# Many rows in flight make the rollout's cache and activations dominate (split over fsdp only).
BIG_ROLLOUT = {**SMALL, "roles": {**SMALL["roles"], "rollout": {"num_generations": 64, "max_new_tokens": 16}}}


def test_auto_disaggregates_rollout_when_only_a_split_fits(registry):
    on8, on4 = estimates(registry, BIG_ROLLOUT, n=8), estimates(registry, BIG_ROLLOUT, n=4)
    together = sum(e.total for e in on8.values() if e)
    split = max(on4["rollout"].total, on4["trainer"].total + on4["reference"].total)
    assert split < together
    p = auto(registry, BIG_ROLLOUT, split + 1024)
    assert (p.policy, p.mode) == ("auto", "disaggregated")
    assert p.role("rollout").devices == (0, 1, 2, 3)
    assert p.role("trainer").devices == p.role("reference").devices == (4, 5, 6, 7)
    assert not any(r.offload for r in p.roles)
    assert not any(b.blocking for b in p.boundaries)
    assert p.notes[0].startswith("auto: disaggregated — all at once rollout + reference + trainer need ")
    assert "rollout on devices 0-3 needs" in p.notes[0]


# A large trainer micro-batch: the trainer dominates and grows on any smaller slice
# (a global batch of 32 items x 2 prompts x 4 generations holds its 256 rows).
BIG_TRAINER = {**SMALL, "train": {**SMALL["train"], "items_per_step": 32},
               "roles": {**SMALL["roles"], "trainer": {"micro_batch_size": 256}}}


def test_auto_offloads_when_each_role_fits_only_alone(registry):
    on8 = estimates(registry, BIG_TRAINER, n=8)
    largest = max(e.total for e in on8.values() if e)
    assert largest == on8["trainer"].total
    p = auto(registry, BIG_TRAINER, largest + 1024)
    assert (p.policy, p.mode) == ("auto", "colocated+offload")
    assert all(r.offload for r in p.roles if r.name != "reward")
    assert p.notes[0].startswith("auto: colocated+offload — all at once rollout + reference + trainer need ")
    assert "no rollout slice fits either" in p.notes[0]


def test_auto_on_one_device_offloads_without_trying_a_split(registry):
    on1 = estimates(registry, SMALL, n=1)
    p = auto(registry, SMALL, max(e.total for e in on1.values() if e) + 1024, n=1)
    assert p.mode == "colocated+offload"
    assert "there is no rollout slice to split off" in p.notes[0]


def test_auto_error_when_nothing_fits_names_role_need_and_capacity(registry):
    need = estimates(registry, SMALL, n=8)["rollout"].total
    with pytest.raises(PlacementError) as exc:
        auto(registry, SMALL, need - 1)
    [problem] = [p for p in exc.value.problems if p.path == "roles.rollout"]
    line = str(problem)
    assert "\n" not in line
    assert line.startswith(f"roles.rollout: needs an estimated {format_bytes(need)} per device")
    assert "placement.policy=auto finds no arrangement that fits" in line
    assert "roles.rollout.num_generations" in line and "fsdp axis (rows are split over it)" in line  # the cache's remedies name rows


def test_auto_is_listed_with_the_other_policies():
    r = CliRunner().invoke(cli, ["placements", "list", "--json"])
    assert r.exit_code == 0
    assert "auto" in r.stdout


# -- plugins and the CLI ----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EchoConfig(RoleConfig):
    pass


def test_third_party_roles_give_an_estimate_or_none(registry):
    plain = RoleSpec(name="echo", description="d", config_type=EchoConfig, consumes={"completion_tokens"}, produces={"echo"})
    sized = attrs.evolve(plain, name="sized", produces={"sized"},
                         memory_estimate=lambda cfg, run, mesh: MemoryEstimate(parameters=1000 // mesh.size))
    broken = attrs.evolve(plain, name="broken", produces={"broken"}, memory_estimate=lambda cfg, run, mesh: 1 / 0)

    class Plugin:
        from rlpipe import hookimpl

        @hookimpl
        def rlpipe_roles(self):
            return [plain, sized, broken]

    with register_plugin(Plugin(), name="echo"):
        from rlpipe import load_registry

        reg = load_registry(warn=lambda m: None)
        p = plan_run(config(reg, {"roles": {"echo": {}, "sized": {}}}), reg, fake_devices(4)).plan
        assert p.role("echo").memory_estimate_bytes is None
        assert p.role("sized").memory_estimate_bytes == 250
        with pytest.raises(PluginError, match="role 'broken': its memory estimate raised ZeroDivisionError"):
            plan_run(config(reg, {"roles": {"broken": {}}}), reg, fake_devices(4))


def test_plan_json_carries_int_estimates_and_keeps_the_schema():
    r = CliRunner().invoke(cli, ["plan", "--json", "--devices", "4", "--set", "placement.policy=auto"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"devices", "policy", "mode", "roles", "boundaries"}
    for role in doc["roles"]:
        assert set(role) == {"name", "devices", "mesh", "colocated_with", "offload", "memory_estimate_bytes"}
        if role["name"] == "reward":
            assert role["memory_estimate_bytes"] is None
        else:
            assert type(role["memory_estimate_bytes"]) is int and role["memory_estimate_bytes"] > 0


def test_plan_table_shows_the_breakdown_and_capacity():
    r = CliRunner().invoke(cli, ["plan", "--devices", "4", "--set", "placement.device_memory_gib=80"])
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert "PARAMETERS  OPTIMIZER  GRADIENTS  KV CACHE  ACTIVATIONS  TOTAL" in out
    trainer = next(ln for ln in out.splitlines() if ln.startswith("trainer ") and "KiB" in ln and "[" not in ln)
    assert len(trainer.split()) == 1 + 6 * 2  # name, then six "<number> <unit>" cells
    assert "device memory: 80.0 GiB per device (placement.device_memory_gib)" in out
    assert "devices 0-3: rollout + reference + trainer: peak " in out
    unknown = CliRunner().invoke(cli, ["plan", "--devices", "4"]).stdout
    assert "device memory: unknown (hypothetical devices report no memory limit; set placement.device_memory_gib)" in unknown
