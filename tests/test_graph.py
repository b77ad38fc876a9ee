"""Deriving the stage graph from what roles consume and produce."""

import pytest
from helpers import config

from rlpipe import GraphError, RoleConfig, RoleSpec, build_graph
from rlpipe.core.graph import SOURCE_FIELDS
from rlpipe.runtime.planning import apply_algorithm, role_specs


def role(name, consumes=(), produces=(), optional=(), sink=False):
    return RoleSpec(name=name, description="", config_type=RoleConfig, consumes=set(consumes),
                    produces=set(produces), optional_consumes=set(optional), sink=sink)


def test_builtin_roles_form_rollout_reward_reference_trainer(registry):
    roles = {n: registry.roles[n] for n in ("rollout", "reward", "reference", "trainer")}
    g = build_graph(roles)
    assert g.order == ("rollout", "reward", "reference", "trainer")
    # rollout -> trainer is implied by rollout -> reward -> trainer (transitive reduction)
    assert g.edge_pairs() == (("rollout", "reward"), ("rollout", "reference"), ("reward", "trainer"), ("reference", "trainer"))
    assert {(e.upstream, e.downstream): e.fields for e in g.edges} == {
        ("rollout", "reward"): {"completion_tokens", "completion_mask"},
        ("rollout", "reference"): {"completion_tokens", "completion_mask"},
        ("reward", "trainer"): {"rewards"},
        ("reference", "trainer"): {"ref_logprobs"},
    }
    assert not any(e.implicit for e in g.edges)
    assert g.heads == ("rollout",) and g.sink == "trainer"


def test_the_default_roles_form_the_four_role_graph(registry):
    cfg, notes = apply_algorithm(config(registry), registry)
    assert notes == []  # the default algorithm (grpo, KL beta 0.04) wants exactly the default roles
    specs = role_specs(cfg, registry)
    assert list(specs) == ["rollout", "reward", "reference", "trainer"]
    # rollout no longer scores: rewards come from the reward role, which runs on the host
    assert "rewards" not in specs["rollout"].produces and specs["reward"].produces == {"rewards"}
    # it decodes prompt and completion and scores them against the source's example
    assert specs["reward"].consumes == {"prompt_tokens", "prompt_mask", "completion_tokens", "completion_mask", "example"}
    assert specs["reward"].consumes - specs["rollout"].produces <= SOURCE_FIELDS
    assert [n for n, s in specs.items() if not s.uses_devices] == ["reward"]
    g = build_graph(specs)
    assert g.order == ("rollout", "reward", "reference", "trainer")
    assert g.edge_pairs() == (("rollout", "reward"), ("rollout", "reference"), ("reward", "trainer"), ("reference", "trainer"))
    assert g.heads == ("rollout",) and g.sink == "trainer"


def test_the_source_provides_prompts_their_ids_and_examples():
    assert SOURCE_FIELDS == {"prompt_tokens", "prompt_mask", "group_id", "example_id", "example"}


def test_order_follows_data_not_config_order(registry):
    roles = {n: registry.roles[n] for n in ("trainer", "critic", "reference", "reward", "rollout")}
    g = build_graph(roles)
    assert g.order[0] == "rollout" and g.order[-1] == "trainer"
    # the critic consumes rewards, so it follows the reward role (rollout -> critic is implied)
    assert g.order.index("reward") < g.order.index("critic")
    assert set(g.edge_pairs()) == {("rollout", "reward"), ("rollout", "reference"), ("reward", "critic"),
                                   ("critic", "trainer"), ("reference", "trainer")}


def test_without_reference_the_trainer_consumes_rollout_through_reward(registry):
    g = build_graph({n: registry.roles[n] for n in ("rollout", "reward", "trainer")})
    # rollout -> trainer (rollout_logprobs, ...) is implied by rollout -> reward -> trainer:
    # items carry every field produced upstream
    assert g.edge_pairs() == (("rollout", "reward"), ("reward", "trainer"))
    assert g.edges[0].fields == {"completion_tokens", "completion_mask"}
    assert g.edges[1].fields == {"rewards"}


def test_without_the_reward_role_nobody_produces_rewards(registry):
    with pytest.raises(GraphError) as e:
        build_graph({n: registry.roles[n] for n in ("rollout", "trainer")})
    assert [str(p) for p in e.value.problems] == [
        "roles.trainer: consumes field 'rewards', which no role in the graph produces"]


def test_a_role_nobody_consumes_flows_into_the_sink():
    g = build_graph({
        "gen": role("gen", ["prompt_tokens"], ["completion_tokens"]),
        "judge": role("judge", ["completion_tokens"], ["judge_scores"]),
        "train": role("train", ["completion_tokens"], sink=True),
    })
    assert set(g.edge_pairs()) == {("gen", "judge"), ("judge", "train")}
    assert [e for e in g.edges if e.implicit] == [g.edges[-1]]


def test_a_consumed_field_nobody_produces_is_an_error_naming_the_role():
    with pytest.raises(GraphError) as e:
        build_graph({"train": role("train", ["completion_tokenz"], sink=True),
                     "gen": role("gen", ["prompt_tokens"], ["completion_tokens"])})
    assert [str(p) for p in e.value.problems] == [
        "roles.train: consumes field 'completion_tokenz', which no role in the graph produces (did you mean 'completion_tokens'?)"]


def test_optional_fields_without_producer_are_fine(registry):
    build_graph({n: registry.roles[n] for n in ("rollout", "reward", "trainer")})  # ref_logprobs, values optional


def test_two_producers_of_one_field_are_an_error():
    with pytest.raises(GraphError, match="roles.b: produces field 'x', which role 'a' already produces"):
        build_graph({"a": role("a", [], ["x"]), "b": role("b", [], ["x"])})
    with pytest.raises(GraphError, match="which the data source already produces"):
        build_graph({"a": role("a", [], ["prompt_tokens"])})


def test_cycles_are_errors_that_show_the_cycle():
    with pytest.raises(GraphError) as e:
        build_graph({"a": role("a", ["y"], ["x"]), "b": role("b", ["x"], ["y"]), "c": role("c", ["x"], sink=True)})
    assert str(e.value.problems[0]) in ("roles: the roles form a cycle: a -> b -> a", "roles: the roles form a cycle: b -> a -> b")


def test_self_consumption_and_two_sinks_are_errors():
    with pytest.raises(GraphError, match="consumes field 'x', which it produces itself"):
        build_graph({"a": role("a", ["x"], ["x"])})
    with pytest.raises(GraphError, match="several sink roles"):
        build_graph({"a": role("a", sink=True), "b": role("b", sink=True)})
