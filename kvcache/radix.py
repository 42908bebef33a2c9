"""Host-side radix prefix cache at page granularity: token prefixes -> KV page ids.

Every edge of the tree is a run of whole pages: a node's `key` holds k * page_size tokens and
its `value` the k page ids that store their KV. Children are keyed by the tokens of their first
page, so siblings never share a first page and a lookup costs one dict hit per node. Only whole
pages are cached or matched: a prompt that ends, or leaves the tree, inside a page shares just
the full pages before that point.

A match or insert that stops inside a node's key splits the node at that page boundary
(page_size 2; letters are tokens, numbers page ids):

    before   root --[a b c d e f | 1 2 3]--> X
    match([a, b, c, d, x, y]) -> ([1, 2], U)
    after    root --[a b c d | 1 2]--> U --[e f | 3]--> X

The new node U is the upper part and the existing object X stays the lower part, so a handle a
caller already holds still names the same whole prefix and its locks stay where they were. U
starts with X's lock count, since every lock on X (or below it) also counted on the path above.

Ownership: the tree holds each cached page id exactly once. `insert` takes the caller's pages
only for positions not yet cached and says which it took (always a suffix of the pages given);
`evict` and `reset` hand ids back. Nothing here touches device memory: the caller frees or
reuses whatever comes back, e.g. with `kvcache.allocator.decref`.

Locks: `lock(node)` pins the prefix a running request reads, adding one to the node and every
ancestor (the root holds no pages and is never counted). A node with lock count 0 therefore has
an unlocked subtree, all of it evictable by repeated leaf removal; `evictable_pages` keeps that
sum incrementally. Eviction removes least-recently-used unlocked leaves, ordered by a logical
clock bumped on every match and insert (deterministic, unlike wall time); a parent left without
children becomes a leaf and may go in the same call. The root is never evicted.

Cost: match and insert O(len(tokens)); lock and unlock O(depth); evict O(L log L) for L leaves
(the leaf set is kept up to date, so eviction never walks the whole tree).
"""

import dataclasses
import heapq
import itertools
from collections.abc import Sequence


@dataclasses.dataclass(slots=True, eq=False)
class Node:
    key: tuple[int, ...]  # [k*G] tokens of this edge; () for the root
    value: list[int]      # [k] page ids, one per page of key; [] for the root
    parent: "Node | None" = dataclasses.field(repr=False)  # None: the root, or removed
    children: dict[tuple[int, ...], "Node"] = dataclasses.field(default_factory=dict, repr=False)
    lock_count: int = 0   # locks taken on this node or any node below it
    last_access: int = 0  # logical clock of the last match / insert through this node


class RadixCache:
    def __init__(self, page_size: int):
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        self.page_size = page_size
        self._clock = 0
        self._root = Node((), [], None)
        self._leaves: set[Node] = set()  # every childless node but the root
        self._cached = 0                 # pages held by the tree
        self._evictable = 0              # pages in nodes with lock_count 0

    @property
    def root(self) -> Node:
        """The empty prefix: holds no pages; `match` returns it when nothing matched."""
        return self._root

    # -- lookup and insertion ---------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> tuple[list[int], Node]:
        """Longest cached prefix of tokens in whole pages: (page ids, deepest matched node).

        len(pages) * page_size tokens matched; the node is the root when nothing did. Marks the
        path as used now. A match that stops inside a node's key splits the node there, so the
        node returned covers exactly the matched prefix (and can be locked as such).
        """
        g = self.page_size
        n = len(tokens) // g * g
        tokens = tuple(map(int, tokens[:n]))
        now = self._tick()
        node, pos, pages = self._root, 0, []
        while pos < n:
            child = node.children.get(tokens[pos:pos + g])
            if child is None:
                break
            m = self._common_pages(child.key, tokens, pos)
            if m < len(child.value):
                child = self._split(child, m)
            child.last_access = now
            pages += child.value
            node, pos = child, pos + m * g
        return pages, node

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> list[int]:
        """Caches tokens[:len(pages) * page_size] -> pages; returns the ids the tree took.

        The tree takes the caller's ids only for positions it did not already cache: those are
        returned, in order, and are always a suffix of `pages`. For the positions already cached
        it keeps its own ids; the caller's ids for them stay the caller's to release. Ids the
        tree takes must not be held by it already. Marks the path as used now.
        """
        g = self.page_size
        n = len(pages) * g
        if len(tokens) < n:
            raise ValueError(f"insert of {len(pages)} pages needs at least {n} tokens at page_size "
                             f"{g}, got {len(tokens)}; pass fewer pages or more tokens")
        tokens = tuple(map(int, tokens[:n]))
        pages = [int(p) for p in pages]
        now = self._tick()
        node, pos = self._root, 0
        while pos < n:
            child = node.children.get(tokens[pos:pos + g])
            if child is None:
                leaf = Node(tokens[pos:], pages[pos // g:], node, last_access=now)
                self._attach(node, leaf)
                return list(leaf.value)
            m = self._common_pages(child.key, tokens, pos)
            if m < len(child.value):
                child = self._split(child, m)
            child.last_access = now
            node, pos = child, pos + m * g
        return []

    # -- locks ------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        """One more lock on node and every ancestor (root excluded): their pages can't be evicted."""
        for n in self._path(node):
            if n.lock_count == 0:
                self._evictable -= len(n.value)
            n.lock_count += 1

    def unlock(self, node: Node) -> None:
        """Undoes one `lock(node)`; ValueError (and no change) if the path holds no such lock."""
        path = self._path(node)
        if any(n.lock_count == 0 for n in path):
            raise ValueError("unlock of a node that is not locked: every unlock needs a lock first")
        for n in path:
            n.lock_count -= 1
            if n.lock_count == 0:
                self._evictable += len(n.value)

    # -- eviction ---------------------------------------------------------------------------
    def evict(self, num_pages: int) -> list[int]:
        """Frees at least num_pages pages if it can, least-recently-used unlocked leaves first.

        Returns the freed ids: possibly more than asked (whole nodes go), fewer only when the
        cache ran out of evictable pages (then `evictable_pages()` is 0).
        """
        seq = itertools.count()  # tie-break, so the heap never compares nodes
        heap = [(n.last_access, next(seq), n) for n in self._leaves if n.lock_count == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_pages:
            _, _, leaf = heapq.heappop(heap)
            parent = self._detach(leaf)
            freed += leaf.value
            if parent in self._leaves and parent.lock_count == 0:
                heapq.heappush(heap, (parent.last_access, next(seq), parent))
        return freed

    def reset(self) -> list[int]:
        """Drops every node and returns all held page ids; ValueError if any node is locked.

        The root stays (a lock taken on it, for a request that matched nothing, stays valid);
        every other node from before the reset is out of the tree and lock / unlock refuse it.
        """
        locked = sum(1 for n in self._root.children.values() if n.lock_count)
        if locked:
            raise ValueError(f"reset with {locked} locked prefix(es) under the root: unlock the "
                             "nodes of every running request first")
        held = self.pages()
        for child in self._root.children.values():
            child.parent = None
        self._root.children.clear()
        self._leaves.clear()
        self._cached = self._evictable = 0
        return held

    def remap(self, moved: dict[int, int]) -> None:
        """Page ids moved by a pool compaction: old id -> new id (others stay)."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            node.value = [moved.get(p, p) for p in node.value]
            stack.extend(node.children.values())

    # -- accounting -------------------------------------------------------------------------
    def evictable_pages(self) -> int:
        return self._evictable

    def cached_pages(self) -> int:
        return self._cached

    def pages(self) -> list[int]:
        """All page ids the tree holds (walks the tree; for checks, not the hot path)."""
        held, stack = [], [self._root]
        while stack:
            node = stack.pop()
            held += node.value
            stack.extend(node.children.values())
        return held

    # -- internals --------------------------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        self._root.last_access = self._clock
        return self._clock

    def _common_pages(self, key: tuple[int, ...], tokens: tuple[int, ...], pos: int) -> int:
        """Whole pages shared by key and tokens[pos:] (both page-aligned in length)."""
        limit = min(len(key), len(tokens) - pos)
        i = 0
        while i < limit and key[i] == tokens[pos + i]:
            i += 1
        return i // self.page_size

    def _split(self, node: Node, m: int) -> Node:
        """Cuts node after its first m pages (0 < m < len(node.value)); returns the new upper part."""
        cut = m * self.page_size
        upper = Node(node.key[:cut], node.value[:m], node.parent,
                     lock_count=node.lock_count, last_access=node.last_access)
        upper.children[node.key[cut:cut + self.page_size]] = node
        node.parent.children[upper.key[:self.page_size]] = upper
        node.key, node.value, node.parent = node.key[cut:], node.value[m:], upper
        return upper

    def _attach(self, parent: Node, leaf: Node) -> None:
        parent.children[leaf.key[:self.page_size]] = leaf
        self._leaves.discard(parent)
        self._leaves.add(leaf)
        self._cached += len(leaf.value)
        self._evictable += len(leaf.value)

    def _detach(self, leaf: Node) -> Node:
        """Removes an unlocked leaf; returns its parent (now a leaf itself if left childless)."""
        parent = leaf.parent
        del parent.children[leaf.key[:self.page_size]]
        self._leaves.discard(leaf)
        if parent is not self._root and not parent.children:
            self._leaves.add(parent)
        self._cached -= len(leaf.value)
        self._evictable -= len(leaf.value)
        leaf.parent = None
        return parent

    def _path(self, node: Node) -> list[Node]:
        """node and its ancestors, root excluded; ValueError if node is not in this tree."""
        path = []
        while node is not self._root:
            if node.parent is None:
                raise ValueError("node is not in this cache: it was evicted, dropped by reset, or "
                                 "comes from another RadixCache; match again for a fresh node")
            path.append(node)
            node = node.parent
        return path
