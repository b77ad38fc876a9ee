"""Colocation policies: the default colocate_with semantics, colocate-all,
disaggregated, and every error the design names."""

import jax
import pytest
import yaml
from helpers import EXAMPLES, config, mesh, plan

from rlpipe import (
    MeshSpec,
    PlacementError,
    PlanContext,
    RolePlacement,
    finish_plan,
    make_mesh,
)
from rlpipe.plugins.placement.disaggregated import split_counts
from rlpipe.runtime.planning import plan_run
from rlpipe.testing import fake_devices


def seed(name):
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


def boundaries(p):
    return {(b.upstream, b.downstream): b.blocking for b in p.boundaries}


# -- the three seed configurations ---------------------------------------------------


def test_colocated_with_offload_shares_devices_under_different_meshes_and_blocks(registry):
    p = plan(registry, seed("colocated_offload"))
    tr, ro, ref, rw = p.role("trainer"), p.role("rollout"), p.role("reference"), p.role("reward")
    assert tr.devices == ro.devices == ref.devices == rw.devices == (0, 1, 2, 3)
    assert tr.mesh == MeshSpec((4, 1), ("fsdp", "tp"))
    assert ro.mesh == MeshSpec((1, 4), ("fsdp", "tp"))
    assert ref.mesh == rw.mesh == tr.mesh  # no mesh, no colocate_with: the trainer's devices *and* mesh
    assert set(ro.colocated_with) == {"trainer", "reward", "reference"}
    assert tr.offload and ro.offload and ref.offload
    assert rw.offload is False  # a host role is never offloaded
    # device roles take turns; the host reward role's edges stream
    assert boundaries(p) == {("rollout", "reward"): False, ("rollout", "reference"): True,
                             ("reward", "trainer"): False, ("reference", "trainer"): True}
    assert p.mode == "colocated+offload"


def test_colocated_without_offload_blocks_nothing(registry):
    p = plan(registry, seed("colocated"))
    assert p.role("rollout").devices == p.role("trainer").devices == (0, 1, 2, 3)
    assert p.role("rollout").mesh.shape == (1, 4)
    assert not any(r.offload for r in p.roles)
    assert set(boundaries(p).values()) == {False}
    assert p.mode == "colocated"


def test_own_mesh_without_colocate_with_is_disaggregated(registry):
    p = plan(registry, seed("disaggregated"))
    assert p.role("trainer").devices == (0, 1, 2, 3)
    assert p.role("rollout").devices == (4, 5, 6, 7)
    assert p.role("rollout").colocated_with == ()
    assert p.role("reference").devices == (0, 1, 2, 3)
    assert set(boundaries(p).values()) == {False}
    assert p.mode == "disaggregated"


def test_offload_on_but_disaggregated_rollout_streams_into_reference(registry):
    data = seed("disaggregated")
    data["placement"] = {"offload": True}
    p = plan(registry, data)
    b = boundaries(p)
    assert b[("rollout", "reference")] is False      # different devices: nothing to take turns on
    assert b[("reference", "trainer")] is True       # reference and trainer time-share
    assert p.role("rollout").offload is False        # offloading a role alone on its devices buys nothing


def test_defaults_put_every_role_on_all_devices(registry):
    p = plan(registry, None, n=8)
    assert all(r.devices == tuple(range(8)) and r.mesh == MeshSpec((8, 1), ("fsdp", "tp")) for r in p.roles)


def test_trainer_without_mesh_takes_the_devices_others_leave(registry):
    p = plan(registry, {"roles": {"rollout": {"mesh": mesh((2, 1))}}}, n=8)
    assert p.role("rollout").devices == (0, 1)
    assert p.role("trainer").devices == (2, 3, 4, 5, 6, 7)
    assert p.role("trainer").mesh.shape == (6, 1)


def test_colocate_with_follows_a_chain_and_actor_means_trainer(registry):
    # ppo with a KL weight keeps both the reference and the critic in the graph
    data = {"algorithm": {"name": "ppo", "options": {"kl_beta": 0.04}},
            "roles": {"trainer": {"mesh": mesh((2, 2))},
                      "rollout": {"colocate_with": "actor", "mesh": mesh((4,), ("tp",))},
                      "reference": {"colocate_with": "rollout"},
                      "critic": {"colocate_with": "reference"}}}
    p = plan(registry, data)
    assert {r.devices for r in p.roles} == {(0, 1, 2, 3)}
    assert p.role("reference").mesh == MeshSpec((4,), ("tp",))   # inherits rollout's mesh
    assert p.role("critic").mesh == MeshSpec((4,), ("tp",))


def test_critic_joins_the_graph_and_the_trainer_waits_for_both_branches(registry):
    p = plan(registry, {"algorithm": {"name": "ppo", "options": {"kl_beta": 0.04}}, "roles": {"critic": {}}})
    assert set(boundaries(p)) == {("rollout", "reward"), ("rollout", "reference"), ("reward", "critic"),
                                  ("reference", "trainer"), ("critic", "trainer")}


def test_the_algorithm_decides_whether_reference_and_critic_are_placed(registry):
    # grpo without a critic estimator: a configured critic is left out, with a note
    planned = plan_run(config(registry, {"roles": {"critic": {}}}), registry, fake_devices(8))
    assert [r.name for r in planned.plan.roles] == ["rollout", "reward", "reference", "trainer"]
    assert planned.notes == ("critic is left out: algorithm 'grpo' does not use it",)
    assert "critic" not in planned.config.roles
    # ppo (kl_beta 0 by default): the critic is added with its defaults, the reference left out
    planned = plan_run(config(registry, {"algorithm": {"name": "ppo"}}), registry, fake_devices(8))
    assert [r.name for r in planned.plan.roles] == ["rollout", "reward", "trainer", "critic"]
    assert planned.config.roles["critic"] == registry.roles["critic"].config_type()
    assert planned.notes == ("reference is left out: algorithm 'ppo' does not use it",
                             "critic is added with default settings: algorithm 'ppo' needs it")
    # a KL weight brings the reference back, and the user's critic settings are kept
    planned = plan_run(config(registry, {"algorithm": {"name": "ppo", "options": {"kl_beta": 0.04}},
                                         "roles": {"critic": {"colocate_with": "reference"}}}), registry, fake_devices(8))
    assert planned.notes == () and planned.config.roles["critic"].colocate_with == "reference"
    assert set(boundaries(planned.plan)) == {("rollout", "reward"), ("rollout", "reference"), ("reward", "critic"),
                                             ("reference", "trainer"), ("critic", "trainer")}


def test_per_role_offload_overrides_the_global_switch(registry):
    p = plan(registry, {"placement": {"offload": True}, "roles": {"rollout": {"offload": False}}})
    assert p.role("rollout").offload is False and p.role("trainer").offload is True
    assert p.role("reward").offload is False
    # trainer and reference still time-share; rollout's edge blocks because reference is offloaded;
    # the host reward role's edges stream
    assert boundaries(p) == {("rollout", "reward"): False, ("rollout", "reference"): True,
                             ("reward", "trainer"): False, ("reference", "trainer"): True}


# -- host roles (uses_devices=False) ------------------------------------------------


def test_with_offload_the_host_reward_role_streams_and_is_never_offloaded(registry):
    # even asked for explicitly, offload does not apply to a host role
    p = plan(registry, {"placement": {"offload": True}, "roles": {"reward": {"offload": True}}})
    assert p.role("reward").devices == p.role("trainer").devices == tuple(range(8))
    assert p.role("reward").offload is False
    assert [r.name for r in p.roles if r.offload] == ["rollout", "reference", "trainer"]
    b = boundaries(p)
    assert b[("rollout", "reward")] is False and b[("reward", "trainer")] is False   # into / out of the host role
    assert b[("rollout", "reference")] is True and b[("reference", "trainer")] is True  # device roles take turns
    assert p.mode == "colocated+offload"


def test_a_device_role_sharing_devices_only_with_host_roles_is_not_offloaded(registry):
    # rollout owns devices 4-7 and shares them only with the host reward role
    p = plan(registry, {"placement": {"offload": True},
                        "roles": {"trainer": {"mesh": mesh((4, 1))}, "rollout": {"mesh": mesh((4, 1))},
                                  "reward": {"colocate_with": "rollout"}}})
    ro, rw = p.role("rollout"), p.role("reward")
    assert ro.devices == rw.devices == (4, 5, 6, 7)
    assert ro.colocated_with == ("reward",) and rw.colocated_with == ("rollout",)
    assert ro.offload is False and rw.offload is False   # nobody to take turns with
    assert p.role("reference").offload is True and p.role("trainer").offload is True
    assert boundaries(p) == {("rollout", "reward"): False, ("rollout", "reference"): False,
                             ("reward", "trainer"): False, ("reference", "trainer"): True}

    # the building block itself: one device role and one host role on the same devices
    m = MeshSpec.default(4)
    roles = [RolePlacement(name="gen", devices=range(4), mesh=m, offload=True),
             RolePlacement(name="score", devices=range(4), mesh=m, offload=True)]
    alone = finish_plan("test", roles, fake_devices(4), PlanContext(edges=(("gen", "score"),), host_roles={"score"}))
    assert [(r.name, r.colocated_with, r.offload) for r in alone.roles] == [("gen", ("score",), False), ("score", ("gen",), False)]
    assert not alone.is_blocking("gen", "score") and alone.mode == "colocated"
    # without the host-role marking the same two roles time-share
    shared = finish_plan("test", roles, fake_devices(4), PlanContext(edges=(("gen", "score"),)))
    assert all(r.offload for r in shared.roles) and shared.is_blocking("gen", "score")


# -- errors ------------------------------------------------------------------------


def problems(excinfo):
    return [str(p) for p in excinfo.value.problems]


def test_unknown_colocate_with_names_the_role_and_suggests(registry):
    with pytest.raises(PlacementError) as e:
        plan(registry, {"roles": {"reference": {"colocate_with": "rolout"}}})
    assert problems(e) == ["roles.reference.colocate_with: unknown role 'rolout' (did you mean 'rollout'?) (roles in this run: rollout, reward, reference, trainer)"]


def test_colocate_with_itself_and_cycles_are_errors(registry):
    with pytest.raises(PlacementError, match="cannot colocate with itself"):
        plan(registry, {"roles": {"rollout": {"colocate_with": "rollout"}}})
    with pytest.raises(PlacementError) as e:
        plan(registry, {"roles": {"rollout": {"colocate_with": "reference"}, "reference": {"colocate_with": "rollout"}}})
    assert "cycle: rollout -> reference -> rollout" in problems(e)[0]
    assert problems(e)[0].startswith("roles.rollout.colocate_with:")


def test_trainer_colocating_with_a_role_that_has_no_devices_is_an_error(registry):
    with pytest.raises(PlacementError, match="no role in trainer -> rollout -> trainer owns devices"):
        plan(registry, {"roles": {"trainer": {"colocate_with": "rollout"}}})


def test_mesh_size_must_match_the_colocation_slice(registry):
    with pytest.raises(PlacementError) as e:
        plan(registry, {"roles": {"trainer": {"mesh": mesh((4, 1))}, "rollout": {"colocate_with": "trainer", "mesh": mesh((1, 2))}}})
    assert problems(e) == ["roles.rollout.mesh.shape: [1, 2] spans 2 devices but rollout shares trainer's 4 devices; the sizes must match"]


def test_more_devices_than_exist(registry):
    with pytest.raises(PlacementError) as e:
        plan(registry, {"roles": {"trainer": {"mesh": mesh((4, 2))}, "rollout": {"mesh": mesh((4, 1))}}})
    assert problems(e) == [("roles: the roles' meshes need 12 devices (trainer 8, rollout 4) but 8 exist; plan for them "
                            "with `rlpipe plan --devices 12`, or on the CPU fake them with "
                            "XLA_FLAGS=--xla_force_host_platform_device_count=12")]
    with pytest.raises(PlacementError, match="plus at least 1 for trainer"):
        plan(registry, {"roles": {"rollout": {"mesh": mesh((8, 1))}}})


def test_colocate_all_puts_every_role_everywhere(registry):
    p = plan(registry, {"placement": {"policy": "colocate-all", "offload": True},
                        "roles": {"rollout": {"mesh": mesh((1, 8))}}})
    assert all(r.devices == tuple(range(8)) for r in p.roles)
    assert p.role("rollout").mesh.shape == (1, 8) and p.role("trainer").mesh.shape == (8, 1)
    assert p.mode == "colocated+offload"
    # every edge between device roles blocks; the host reward role's edges stream
    assert boundaries(p) == {("rollout", "reward"): False, ("rollout", "reference"): True,
                             ("reward", "trainer"): False, ("reference", "trainer"): True}
    assert [r.name for r in p.roles if r.offload] == ["rollout", "reference", "trainer"]
    with pytest.raises(PlacementError, match=r"roles.rollout.mesh.shape: \[1, 4\] spans 4 devices; colocate-all gives every role all 8"):
        plan(registry, {"placement": {"policy": "colocate-all"}, "roles": {"rollout": {"mesh": mesh((1, 4))}}})


def test_disaggregated_splits_by_fraction_and_others_join_the_trainer(registry):
    p = plan(registry, {"placement": {"policy": "disaggregated", "options": {"groups": [
        {"roles": ["rollout"], "fraction": 0.75}, {"roles": ["trainer"], "fraction": 0.25}]}}})
    assert p.role("rollout").devices == (0, 1, 2, 3, 4, 5)
    assert p.role("trainer").devices == p.role("reference").devices == (6, 7)
    assert p.mode == "disaggregated"


def test_disaggregated_errors_name_the_option(registry):
    with pytest.raises(PlacementError) as e:
        plan(registry, {"placement": {"policy": "disaggregated", "options": {"groups": [
            {"roles": ["rolout"], "fraction": 0.5}, {"roles": ["trainer"], "fraction": 0.4}]}}})
    msgs = problems(e)
    assert msgs[0].startswith("placement.options.groups[0].roles: 'rolout' is not a role in this run (did you mean 'rollout'?)")
    assert msgs[1] == "placement.options.groups: fractions sum to 0.9; they must sum to 1"
    with pytest.raises(PlacementError, match=r"groups\[0\].fraction: 0.1 of 4 devices is no device"):
        plan(registry, {"placement": {"policy": "disaggregated", "options": {"groups": [
            {"roles": ["rollout"], "fraction": 0.1}, {"roles": ["trainer"], "fraction": 0.9}]}}}, n=4)


@pytest.mark.parametrize(("fractions", "n", "expected"), [
    ([0.5, 0.5], 8, [4, 4]), ([1 / 3, 1 / 3, 1 / 3], 8, [3, 3, 2]), ([0.9, 0.1], 3, [3, 0]), ([0.25, 0.75], 1, [0, 1]),
])
def test_split_counts_uses_every_device_once(fractions, n, expected):
    assert split_counts(fractions, n) == expected
    assert sum(split_counts(fractions, n)) == n


# -- from plan to jax.sharding.Mesh ----------------------------------------------------------


def test_make_mesh_lays_the_same_devices_out_in_each_roles_shape(registry):
    p = plan_run(config(registry, yaml.safe_load((EXAMPLES / "colocated.yaml").read_text())), registry).plan
    tm, rm = make_mesh(p.role("trainer")), make_mesh(p.role("rollout"))
    assert dict(tm.shape) == {"fsdp": 4, "tp": 1} and dict(rm.shape) == {"fsdp": 1, "tp": 4}
    assert {d.id for d in tm.devices.flat} == {d.id for d in rm.devices.flat} == {0, 1, 2, 3}
    assert all(t == jax.sharding.AxisType.Auto for t in tm.axis_types)


def test_role_placement_refuses_a_mesh_of_the_wrong_size():
    with pytest.raises(ValueError, match="needs 4 devices, placement gives 2"):
        RolePlacement(name="x", devices=(0, 1), mesh=MeshSpec((2, 2), ("a", "b")))


def test_plan_uses_the_devices_jax_sees_by_default(registry):
    p = plan_run(config(registry), registry).plan
    assert p.devices == tuple(d.id for d in jax.devices()) and len(p.devices) == 8


def test_a_single_device_plan(registry):
    p = plan_run(config(registry), registry, fake_devices(1)).plan
    assert all(r.mesh.shape == (1, 1) for r in p.roles)
