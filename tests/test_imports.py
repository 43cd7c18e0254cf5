"""No import cycle among cellvec's modules, at any depth.

The import contracts in `.importlinter` (run by `make lint`) forbid cycles between the
children of every package and keep the layers pointing one way; neither sees a cycle
between a package's `__init__` and a module inside it, which this test does. Like
import-linter, it counts every import grimp finds: inside functions and under
TYPE_CHECKING too, so an import moved into a function cannot hide a cycle.
"""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter, in the dev extra")


def import_cycles(package: str = "cellvec") -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    graph = grimp.build_graph(package)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def test_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "Import cycles (each line: modules that import each other):\n" + "\n".join(
        "  " + ", ".join(c) for c in cycles
    )
