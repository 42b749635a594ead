"""The last stage of the JSON Schema compiler (schema_compiler.py): its node list turned into the
native recogniser's table."""
from __future__ import annotations

import math
from typing import Dict

from . import _C
from ._C import LlamasError
from .schema_compiler import MAX_DEPTH, reachable


def finish_nodes(nodes: list, root: int) -> "_C.JsonSchema":
    """Aliases ($ref) resolved, anyOf flattened, what admits no value pruned, each node's least
    nesting depth computed, and the reachable nodes written to a native table, renumbered from 0."""
    def target(i: int) -> int:
        seen = set()
        while nodes[i]["kind"] == "alias":
            if i in seen:
                raise LlamasError("[json_schema] a '$ref' cycle with no schema in it")
            seen.add(i)
            i = nodes[i]["children"][0]
        return i

    for n in nodes:
        n["children"] = [target(c) for c in n["children"]]
    root = target(root)
    for n in nodes:
        if n["kind"] == "anyOf":
            leaves, stack, seen = [], list(reversed(n["children"])), set()
            while stack:
                c = stack.pop()
                if c in seen:
                    continue
                seen.add(c)
                if nodes[c]["kind"] == "anyOf":
                    stack.extend(reversed(nodes[c]["children"]))
                else:
                    leaves.append(c)
            n["children"] = leaves
    ok = [False] * len(nodes)  # least fixed point: admits some value (recursion must bottom out)
    changed = True
    while changed:
        changed = False
        for i, n in enumerate(nodes):
            if ok[i] or n["kind"] in ("never", "alias"):
                continue
            kids = n["children"]
            if n["kind"] == "anyOf":
                now = any(ok[c] for c in kids)
            elif n["kind"] == "object":  # (only the schema's properties are written)
                now = all(ok[c] for c, req in zip(kids, n["required"]) if req) and \
                    sum(ok[c] for c in kids) >= n["min_count"] and \
                    (n["max_count"] is None or sum(n["required"]) <= n["max_count"])
            elif n["kind"] == "map":
                now = n["min_count"] == 0 or ok[kids[0]]
            elif n["kind"] == "array":
                now = n["min_count"] == 0 or ok[kids[0]]
            else:
                now = True
            if now:
                ok[i] = changed = True
    if not ok[root]:
        raise LlamasError("[json_schema] the schema admits no value")
    for n in nodes:
        kids = n["children"]
        if n["kind"] == "anyOf":
            n["children"] = [c for c in kids if ok[c]]
        elif n["kind"] == "object":
            keep = [i for i, (c, req) in enumerate(zip(kids, n["required"])) if ok[c] or req]
            for key in ("children", "literals", "required"):
                n[key] = [n[key][i] for i in keep]
        elif n["kind"] == "array" and not ok[kids[0]]:
            n["max_count"] = 0
        elif n["kind"] == "map" and not ok[kids[0]]:
            n.update(kind="object", children=[], literals=[], required=[])  # only {}
    # levels of nesting each node's shortest value needs (least fixed point again)
    depth = [math.inf] * len(nodes)
    changed = True
    while changed:
        changed = False
        for i, n in enumerate(nodes):
            kids, kind = n["children"], n["kind"]
            if kind in ("never", "alias") or not ok[i]:
                continue
            if kind == "anyOf":
                d = min(depth[c] for c in kids)
            elif kind == "object":
                d = 1 + max([depth[c] for c, req in zip(kids, n["required"]) if req], default=0)
            elif kind == "array" and n["min_count"] > 0:
                d = 1 + depth[kids[0]]
            else:
                d = 1
            if d < depth[i]:
                depth[i], changed = d, True
    if depth[root] > MAX_DEPTH:
        raise LlamasError(f"[json_schema] the schema's values nest {depth[root]} deep at least; at most {MAX_DEPTH}")
    order, index = reachable(root, lambda i: nodes[i]["children"])
    out = _C.JsonSchema()
    dfas: Dict[int, int] = {}
    for i in order:
        d = nodes[i]["dfa"]
        if d is not None and id(d) not in dfas:
            dfas[id(d)] = out.add_dfa(d.accepting, d.edges, d.dist)
        n = nodes[i]
        if n["kind"] == "never":  # only under an array whose maxItems became 0: never written
            n = dict(n, kind="enum", literals=[b"null"])
        out.add_node(n["kind"], [index[c] for c in n["children"]], n["literals"], n["required"], n["min_count"],
                     2 ** 63 - 1 if n["max_count"] is None else n["max_count"], n["lo"], n["hi"],
                     n["lo_exclusive"], n["hi_exclusive"], int(min(depth[i], 1000)) if ok[i] else 1000,
                     -1 if n["dfa"] is None else dfas[id(n["dfa"])])
    out.root = 0
    out.validate()
    return out
