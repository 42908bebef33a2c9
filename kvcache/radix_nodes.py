"""What the radix prefix cache (kvcache.radix) is made of: its nodes and the operations on one
node or path (split, compare, walk), the moves it logs for the host tier, and the order in
which it evicts.

LRU order (`LRU`): one heap per tier of (last_access, node), kept across calls rather than
rebuilt from every leaf per eviction. A node is pushed whenever it becomes an unlocked leaf or
is used while one; an entry whose node has since been used again, locked, or left the leaves
is stale and skipped when it comes up. The leaves of one tier never share a last_access (a
clock tick stamps one root path, and only its deepest node of a tier can be a leaf), so the
order is exactly that of sorting the unlocked leaves.
"""

import dataclasses
import heapq
import itertools
from typing import NamedTuple


class HostMove(NamedTuple):
    """One change to the host tier's data, logged in the order the tree decided it. "offload":
    device pages -> host slots; "load": host slots -> device pages (the slots are free after);
    "discard": host slots whose data is no longer needed (pages empty)."""
    op: str
    pages: list[int]
    slots: list[int]


@dataclasses.dataclass(slots=True, eq=False)
class Node:
    key: tuple[int, ...]  # [k*G] tokens of this edge; () for the root
    value: list[int]      # [k] page ids (host slot ids if host), one per page of key; [] for the root
    parent: "Node | None" = dataclasses.field(repr=False)  # None: the root, or removed
    children: dict[tuple[int, ...], "Node"] = dataclasses.field(default_factory=dict, repr=False)
    lock_count: int = 0   # locks taken on this node or any node below it
    last_access: int = 0  # logical clock of the last match / insert through this node
    host: bool = False    # its pages are in the host tier


class LRU:
    """The unlocked nodes of one tier's leaf set (`leaves`, which the tree keeps up to date),
    least recently used first: a heap of (last_access, seq, node) with lazy deletion. `push`
    every node that may have become an unlocked leaf or was used while one; `pop` skips the
    entries that went stale since, and the heap is rebuilt from the leaves once stale entries
    outnumber them, so it stays O(L)."""

    def __init__(self, leaves: set[Node]):
        self.leaves = leaves
        self.heap: list[tuple[int, int, Node]] = []
        self._seq = itertools.count()    # tie-break between entries of one node

    def push(self, node: Node) -> None:
        if node.lock_count == 0 and node in self.leaves:
            heapq.heappush(self.heap, (node.last_access, next(self._seq), node))
            if len(self.heap) > 2 * len(self.leaves) + 64:
                self.heap = [(n.last_access, next(self._seq), n) for n in self.leaves
                             if n.lock_count == 0]
                heapq.heapify(self.heap)

    def pop(self) -> Node | None:
        """The least recently used unlocked leaf, or None; it stays a leaf: the caller removes
        it (or moves it to another tier) before the next pop."""
        while self.heap:
            last_access, _, node = heapq.heappop(self.heap)
            if last_access == node.last_access and node.lock_count == 0 and node in self.leaves:
                return node
        return None


def common_pages(key: tuple[int, ...], tokens: tuple[int, ...], pos: int, g: int) -> int:
    """Whole pages of g tokens shared by key and tokens[pos:] (both page-aligned in length).
    Compares whole slices (in C), not token by token: a 2048-token match cost ~0.15 ms in
    Python."""
    limit = min(len(key), len(tokens) - pos)
    if key[:limit] == tokens[pos:pos + limit]:
        return limit // g
    m = 0
    while key[m * g:(m + 1) * g] == tokens[pos + m * g:pos + (m + 1) * g]:
        m += 1
    return m


def split(node: Node, m: int, g: int) -> Node:
    """Cuts node after its first m pages of g tokens (0 < m < len(node.value)); returns the new
    upper part (the node object stays the lower part)."""
    cut = m * g
    upper = Node(node.key[:cut], node.value[:m], node.parent, lock_count=node.lock_count,
                 last_access=node.last_access, host=node.host)
    upper.children[node.key[cut:cut + g]] = node
    node.parent.children[upper.key[:g]] = upper
    node.key, node.value, node.parent = node.key[cut:], node.value[m:], upper
    return upper


def subtree(root: Node) -> list[Node]:
    """root and every node below it."""
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    return out


def path_to(root: Node, node: Node) -> list[Node]:
    """node and its ancestors, root excluded; ValueError if node is not in root's tree."""
    path = []
    while node is not root:
        if node.parent is None:
            raise ValueError("node is not in this cache: it was evicted, dropped by reset, or "
                             "comes from another RadixCache; match again for a fresh node")
        path.append(node)
        node = node.parent
    return path
