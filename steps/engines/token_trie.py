"""Token sequences merged on shared prefixes, and the plan that packs a trie's subtrees into rows.

Used by the transformers engine's scoring: every distinct prefix of one call is one node, run
through the network once; ``plan_rows`` groups subtrees of similar size into batches by their
estimated cost, so rows need almost no padding.
"""

from __future__ import annotations

from collections.abc import Sequence

# Estimated work of a forward pass, in units of one token through the layers: each key a
# token attends to adds about 4 * head dims * layers FLOPs against 2 * parameters for the
# token itself (~3e-4 for SmolLM2-135M); each pass has a fixed cost of a few tokens.
_KEY_COST = 4e-4
_SLOT_COST = 8.0
# (the uncached nodes above a subtree's root, that root): one unit of a packed row
Item = tuple[tuple[int, ...], int]


class TokenTrie:
    """Every token sequence of one call, merged on shared prefixes: one node per distinct prefix.

    A node is a token at a position (its depth); its hidden state depends only on
    its ancestors, so each node is run exactly once whichever requests share it.
    ``reads[n]`` are the token ids whose log-probs are read from node ``n``'s
    output (the next token of a scored continuation, or a judge's options).
    Node 0 is the empty root.
    """

    def __init__(self) -> None:
        self.token: list[int] = [-1]
        self.parent: list[int] = [-1]
        self.depth: list[int] = [-1]
        self.children: list[dict[int, int]] = [{}]
        self.reads: dict[int, set[int]] = {}
        self._ends: dict[tuple[int, ...], int] = {}
        self.size: list[int] = []

    def add(self, tokens: Sequence[int], start: int = 0) -> list[int]:
        """The node of each token of ``tokens`` placed below node ``start``, creating what is missing."""
        nodes, node = [], start
        for token in tokens:
            child = self.children[node].get(token)
            if child is None:
                child = len(self.token)
                self.children[node][token] = child
                self.token.append(token)
                self.parent.append(node)
                self.depth.append(self.depth[node] + 1)
                self.children.append({})
            nodes.append(child)
            node = child
        return nodes

    def end_of(self, prefix: tuple[int, ...]) -> int:
        """The node that ends ``prefix`` (0 for an empty one); many requests share few prefixes."""
        if prefix not in self._ends:
            self._ends[prefix] = self.add(prefix)[-1] if prefix else 0
        return self._ends[prefix]

    def read(self, node: int, token: int) -> None:
        self.reads.setdefault(node, set()).add(token)

    def seal(self) -> None:
        """Subtree sizes (children are always numbered after their parent)."""
        self.size = [1] * len(self.token)
        for node in range(len(self.token) - 1, 0, -1):
            self.size[self.parent[node]] += self.size[node]

    def subtree(self, root: int) -> list[int]:
        """The nodes below and including ``root``, every parent before its children."""
        order, stack = [], [root]
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(self.children[node].values()))
        return order

    def only_child(self, node: int) -> int | None:
        kids = self.children[node]
        return next(iter(kids.values())) if len(kids) == 1 else None


def plan_rows(
    sizes: dict[int, int], cached: int, row_tokens: int, batch_tokens: int
) -> list[list[list[int]]]:
    """Subtrees packed into rows, rows grouped into batches: the plan with the least estimated work.

    ``sizes`` maps each subtree's root to its node count; every row sees the
    ``cached`` tokens above the subtrees. A padded slot costs a whole token,
    while packing several subtrees into one row costs only attention to keys
    they do not see. So subtrees are packed first-fit (largest first) into rows
    of a width, for two widths (the largest subtree, and ``row_tokens``), and
    the plan with the smaller estimate is kept.
    """
    order = sorted(sizes, key=sizes.__getitem__, reverse=True)
    best: tuple[float, list[list[list[int]]]] | None = None
    for width in sorted({sizes[order[0]], row_tokens}):
        rows: list[list[int]] = []
        loads: list[int] = []
        for root in order:
            fit = next((i for i, load in enumerate(loads) if load + sizes[root] <= width), None)
            if fit is None:
                rows.append([root])
                loads.append(sizes[root])
            else:
                rows[fit].append(root)
                loads[fit] += sizes[root]
        batches: list[list[list[int]]] = []
        cost, batch_width = 0.0, 0
        for i in sorted(range(len(rows)), key=loads.__getitem__, reverse=True):
            if not batches or (len(batches[-1]) + 1) * batch_width > batch_tokens:
                batches.append([])
                batch_width = loads[i]
                cost += _SLOT_COST
            batches[-1].append(rows[i])
            cost += batch_width * (1 + _KEY_COST * (cached + batch_width))
        if best is None or cost < best[0]:
            best = (cost, batches)
    assert best is not None
    return best[1]
