"""The stage graph, derived from what roles consume and produce.

:func:`build_graph` turns role specs into a DAG (an edge ``u -> v`` when ``v``
consumes a field ``u`` produces), checks it (every consumed field has exactly
one producer, no cycles), and reduces it transitively: items carry every field
produced upstream, so ``rollout -> trainer`` is implied by
``rollout -> reference -> trainer``.  :mod:`rlpipe.core.executor` runs it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import attrs

from rlpipe.core.errors import GraphError, Problem, suggest
from rlpipe.core.specs import RoleSpec

#: The pseudo-role that feeds prompts into the graph.
SOURCE = "source"

#: Fields the data source provides to every item.
#: ``example`` is a host-side object array of each prompt's example (its
#: answer and metadata, as the task gives them) for reward functions.
SOURCE_FIELDS: frozenset[str] = frozenset({"prompt_tokens", "prompt_mask", "group_id", "example_id", "example"})


@attrs.frozen
class Edge:
    """``upstream -> downstream``, carrying ``fields``; ``implicit`` for the edge
    that brings a role nobody consumes into the sink."""

    upstream: str
    downstream: str
    fields: frozenset[str] = frozenset()
    implicit: bool = False


@attrs.frozen(kw_only=True)
class StageGraph:
    """A checked, transitively reduced DAG of roles.

    Attributes:
        order: roles in a topological order (ties broken by config order).
        edges: role-to-role edges.
        sink: the role at the end (the trainer), or ``None``.
        produces: each role's declared output fields.
    """

    order: tuple[str, ...]
    edges: tuple[Edge, ...]
    sink: str | None
    produces: Mapping[str, frozenset[str]]
    source_fields: frozenset[str] = SOURCE_FIELDS

    def upstream(self, role: str) -> list[str]:
        return [e.upstream for e in self.edges if e.downstream == role]

    def downstream(self, role: str) -> list[str]:
        return [e.downstream for e in self.edges if e.upstream == role]

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(r for r in self.order if not self.upstream(r))

    @property
    def terminals(self) -> tuple[str, ...]:
        return (self.sink,) if self.sink else tuple(r for r in self.order if not self.downstream(r))

    def edge_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((e.upstream, e.downstream) for e in self.edges)


def _find_cycle(nodes: Sequence[str], succ: Mapping[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(succ[n]):
            if m not in nodes:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in nodes:
        if n not in state:
            found = visit(n)
            if found:
                return found
    return list(nodes)


def build_graph(roles: Mapping[str, RoleSpec], *, source_fields: Iterable[str] = SOURCE_FIELDS) -> StageGraph:
    """Derives the stage graph from role specs (in config order).

    Raises:
        GraphError: a field produced twice, a consumed field nobody produces,
            several sink roles, or a cycle; each problem names the role.
    """
    source_fields = frozenset(source_fields)
    names = list(roles)
    rank = {n: i for i, n in enumerate(names)}
    problems: list[Problem] = []

    producer: dict[str, str] = {f: SOURCE for f in source_fields}
    for name, spec in roles.items():
        clashes: dict[str, list[str]] = defaultdict(list)  # other producer -> fields, one problem each
        for f in sorted(spec.produces):
            if f in producer:
                clashes[producer[f]].append(f)
            else:
                producer[f] = name
        for other, dup in clashes.items():
            what = f"field {dup[0]!r}" if len(dup) == 1 else "fields " + ", ".join(map(repr, dup))
            if other == SOURCE:
                problems.append(Problem(f"roles.{name}", f"produces {what}, which the data source already produces; "
                                                         "a field has one producer"))
            else:
                problems.append(Problem(f"roles.{name}", f"produces {what}, which role {other!r} already produces; a field "
                                                         f"has one producer: to replace {other!r} with {name!r}, drop it "
                                                         f"with roles.{other}: null (--set roles.{other}=null)"))

    fields: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name, spec in roles.items():
        for f in sorted(spec.consumes | spec.optional_consumes):
            p = producer.get(f)
            if p is None:
                if f in spec.consumes:
                    problems.append(Problem(f"roles.{name}", f"consumes field {f!r}, which no role in the graph produces{suggest(f, producer)}"))
                continue
            if p == name:
                problems.append(Problem(f"roles.{name}", f"consumes field {f!r}, which it produces itself"))
            elif p != SOURCE:
                fields[(p, name)].add(f)

    sinks = [n for n, s in roles.items() if s.sink]
    if len(sinks) > 1:
        problems.append(Problem("roles", f"several sink roles ({', '.join(sinks)}); a graph has one"))
    if problems:
        raise GraphError(problems)

    succ: dict[str, set[str]] = {n: set() for n in names}
    for u, v in fields:
        succ[u].add(v)

    def reachable(src: str) -> set[str]:
        seen, todo = set(), [src]
        while todo:
            for m in succ[todo.pop()]:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    sink = sinks[0] if sinks else None
    implicit: set[tuple[str, str]] = set()
    if sink is not None:
        # A role nobody consumes still contributes its fields: it flows into the sink.
        for n in names:
            if n != sink and not succ[n] and n not in reachable(sink):
                succ[n].add(sink)
                implicit.add((n, sink))
                fields[(n, sink)] = set(roles[n].produces)

    # Kahn's algorithm, ties broken by config order.
    indeg = {n: 0 for n in names}
    for u in names:
        for v in succ[u]:
            indeg[v] += 1
    ready = sorted((n for n in names if indeg[n] == 0), key=rank.__getitem__)
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in succ[n]:
            indeg[m] -= 1
            if indeg[m] == 0:
                ready.append(m)
                ready.sort(key=rank.__getitem__)
    if len(order) != len(names):
        left = [n for n in names if n not in order]
        cycle = _find_cycle(left, succ)
        raise GraphError(Problem("roles", f"the roles form a cycle: {' -> '.join(cycle)}"))

    # Transitive reduction: drop u -> v when v is reachable from u another way.
    edges = []
    for u in order:
        for v in sorted(succ[u], key=rank.__getitem__):
            if any(v in reachable(w) for w in succ[u] if w != v):
                continue
            edges.append(Edge(u, v, frozenset(fields[(u, v)]), (u, v) in implicit))
    return StageGraph(order=tuple(order), edges=tuple(edges), sink=sink,
                      produces={n: roles[n].produces for n in names}, source_fields=source_fields)
