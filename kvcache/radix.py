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

LRU order: kvcache.radix_nodes.LRU.

Host tier (host_pages > 0): a second level of the cache in host memory, as SGLang's HiCache.
`evict` moves a victim's pages to host slots instead of dropping them while the tier has room
(colder host leaves are dropped for good to make it); the node stays in the tree, host-resident
(`host`, its value then slot ids). A host node's children are host nodes too: the device part
of the tree is a top subtree, so the pages a request shares are always a path from the root.
`match` stops at the first host node; `match_host` goes on through them, and `load` brings
them back into fresh device pages. An `insert` whose pages cover a host node takes the caller's
pages for it and drops the host copy. Nothing here copies data: every change to the tier is
logged as a `HostMove`, and the caller (kvcache.offload) carries them out in order.

    root --[a b | 1]--> X --[c d e f | 2 3]--> Y (host: slots 0 1)
    match([a b c d]) -> ([1], X);  match_host([a b c d]) -> ([1], Y', [Y'])  (Y split: c d)
    load([Y'], [7]) -> Y' holds page 7; logs ("load", [7], [0])

Tokens are compared as given: pass Python ints (numpy scalars hash and compare alike, but
slower).

Cost: match and insert O(len(tokens)); lock and unlock O(depth); evict O(log L) per node it
takes for L leaves, amortized (it never walks the tree or the leaves).
"""

from collections.abc import Sequence

from kvcache.radix_nodes import LRU, HostMove, Node, common_pages, path_to, split, subtree


class RadixCache:
    def __init__(self, page_size: int, host_pages: int = 0):
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        if not isinstance(host_pages, int) or host_pages < 0:
            raise ValueError(f"host_pages must be an int >= 0, got {host_pages!r}")
        self.page_size = page_size
        self.host_capacity = host_pages
        self._clock = 0
        self._root = Node((), [], None)
        self._leaves: set[Node] = set()       # device nodes (not the root) with no device child
        self._host_leaves: set[Node] = set()  # host nodes with no child
        self._lru = LRU(self._leaves)
        self._host_lru = LRU(self._host_leaves)
        self._cached = 0                 # device pages held by the tree
        self._evictable = 0              # device pages in nodes with lock_count 0
        self._host_free = list(range(host_pages - 1, -1, -1))  # pop() gives the lowest slot
        self._host_evictable = 0         # host pages in nodes with lock_count 0
        self._moves: list[HostMove] = []

    @property
    def root(self) -> Node:
        """The empty prefix: holds no pages; `match` returns it when nothing matched."""
        return self._root

    # -- lookup and insertion ---------------------------------------------------------------
    def match(self, tokens: Sequence[int]) -> tuple[list[int], Node]:
        """Longest prefix of tokens cached on the device, in whole pages: (page ids, deepest
        matched node).

        len(pages) * page_size tokens matched; the node is the root when nothing did. Marks the
        path as used now. A match that stops inside a node's key splits the node there, so the
        node returned covers exactly the matched prefix (and can be locked as such).
        """
        pages, node, _ = self._walk(tokens, into_host=False)
        return pages, node

    def match_host(self, tokens: Sequence[int]) -> tuple[list[int], Node, list[Node]]:
        """`match` continued through the host tier: (device page ids, deepest matched node, the
        host nodes of the match, top down). When that list is not empty the node is its last:
        lock the node, then `load` the list, or unlock it, before anything else evicts."""
        return self._walk(tokens, into_host=True)

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> list[int]:
        """Caches tokens[:len(pages) * page_size] -> pages; returns the ids the tree took.

        The tree takes the caller's ids only for positions it did not already cache on the
        device (host copies of them are dropped): those are returned, in order, and are always
        a suffix of `pages`. For the positions already cached it keeps its own ids; the caller's
        ids for them stay the caller's to release. Ids the tree takes must not be held by it
        already. Marks the path as used now.
        """
        return self._insert(tokens, pages)[0]

    def insert_locked(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[list[int], Node]:
        """`insert`, then `lock` on the node that covers the inserted prefix: (the ids the tree
        took, that node; the root when pages is empty). One walk where `insert`, `match` and
        `lock` take two: the same tree, locks and eviction order (the clock ticks once less)."""
        taken, node = self._insert(tokens, pages)
        self.lock(node)
        return taken, node

    def _insert(self, tokens: Sequence[int], pages: Sequence[int]) -> tuple[list[int], Node]:
        g = self.page_size
        n = len(pages) * g
        if len(tokens) < n:
            raise ValueError(f"insert of {len(pages)} pages needs at least {n} tokens at page_size "
                             f"{g}, got {len(tokens)}; pass fewer pages or more tokens")
        tokens = tuple(tokens[:n])
        now = self._tick()
        node, pos, taken = self._root, 0, []
        while pos < n:
            child = node.children.get(tokens[pos:pos + g])
            if child is None:
                leaf = Node(tokens[pos:], [int(p) for p in pages[pos // g:]], node, last_access=now)
                self._attach(node, leaf)
                return taken + leaf.value, leaf
            m = common_pages(child.key, tokens, pos, self.page_size)
            if m < len(child.value):
                child = split(child, m, self.page_size)
            self._touch(child, now)
            if child.host:
                self._to_device(child, pages[pos // g:pos // g + m], "discard")
                taken += child.value
            node, pos = child, pos + m * g
        return taken, node

    # -- locks ------------------------------------------------------------------------------
    def lock(self, node: Node) -> None:
        """One more lock on node and every ancestor (root excluded): their pages can't be evicted."""
        for n in path_to(self._root, node):
            if n.lock_count == 0:
                self._count(n, -1)
            n.lock_count += 1

    def unlock(self, node: Node) -> None:
        """Undoes one `lock(node)`; ValueError (and no change) if the path holds no such lock."""
        path = path_to(self._root, node)
        if any(n.lock_count == 0 for n in path):
            raise ValueError("unlock of a node that is not locked: every unlock needs a lock first")
        for n in path:
            n.lock_count -= 1
            if n.lock_count == 0:
                self._count(n, +1)
                self._lru_of(n).push(n)

    # -- eviction and the host tier ---------------------------------------------------------
    def evict(self, num_pages: int) -> list[int]:
        """Frees at least num_pages device pages if it can, least-recently-used unlocked leaves
        (device nodes without a device child) first. With a host tier, a victim moves there
        (logged as an "offload") when the tier has or can make room; otherwise it is dropped
        with the host nodes below it.

        Returns the freed ids: possibly more than asked (whole nodes go), fewer only when the
        cache ran out of evictable pages (then `evictable_pages()` is 0).
        """
        freed: list[int] = []
        while len(freed) < num_pages:
            leaf = self._lru.pop()
            if leaf is None:
                break
            freed += leaf.value
            if self._host_room(len(leaf.value)):
                self._to_host(leaf)
            else:
                self._remove(leaf)
        return freed

    def load(self, nodes: list[Node], pages: Sequence[int]) -> list[int]:
        """Brings the host nodes that `match_host` returned (top down) back into fresh device
        pages, one per page of theirs in order, which the tree takes; logs a "load" per node.
        Returns the page ids."""
        pages = [int(p) for p in pages]
        if len(pages) != sum(len(n.value) for n in nodes):
            raise ValueError(f"{len(pages)} pages to load {sum(len(n.value) for n in nodes)}")
        i = 0
        for node in nodes:
            if not node.host or node.parent is None or node.parent.host:
                raise ValueError("load takes the host nodes of one match_host, top down")
            self._to_device(node, pages[i:i + len(node.value)], "load")
            i += len(node.value)
        return pages

    def take_moves(self) -> list[HostMove]:
        """The host-tier moves logged since the last call, oldest first. Carry them out in this
        order: a page or slot one frees may be reused by a later one."""
        moves, self._moves = self._moves, []
        return moves

    def reset(self) -> list[int]:
        """Drops every node and returns all held device page ids (host slots are discarded);
        ValueError if any node is locked.

        The root stays (a lock taken on it, for a request that matched nothing, stays valid);
        every other node from before the reset is out of the tree and lock / unlock refuse it.
        """
        locked = sum(1 for n in self._root.children.values() if n.lock_count)
        if locked:
            raise ValueError(f"reset with {locked} locked prefix(es) under the root: unlock the "
                             "nodes of every running request first")
        held, slots = self.pages(), self.host_slots()
        if slots:
            self._moves.append(HostMove("discard", [], slots))
        for child in self._root.children.values():
            child.parent = None
        self._root.children.clear()
        self._leaves.clear()
        self._host_leaves.clear()
        self._lru.heap.clear()
        self._host_lru.heap.clear()
        self._cached = self._evictable = self._host_evictable = 0
        self._host_free = list(range(self.host_capacity - 1, -1, -1))
        return held

    def remap(self, moved: dict[int, int]) -> None:
        """Device page ids moved by a pool compaction: old id -> new id (others stay)."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            if not node.host:
                node.value = [moved.get(p, p) for p in node.value]
                stack.extend(node.children.values())

    # -- accounting -------------------------------------------------------------------------
    def evictable_pages(self) -> int:
        return self._evictable

    def cached_pages(self) -> int:
        return self._cached

    def host_pages(self) -> int:
        """Host slots held (of host_capacity)."""
        return self.host_capacity - len(self._host_free)

    def pages(self) -> list[int]:
        """All device page ids the tree holds (walks the tree; for checks, not the hot path)."""
        return [p for n in subtree(self._root) if not n.host for p in n.value]

    def host_slots(self) -> list[int]:
        """All host slot ids the tree holds (walks the tree)."""
        return [s for n in subtree(self._root) if n.host for s in n.value]

    # -- internals --------------------------------------------------------------------------
    def _walk(self, tokens, into_host: bool) -> tuple[list[int], Node, list[Node]]:
        g = self.page_size
        n = len(tokens) // g * g
        now = self._tick()
        node, pos, pages, hosted = self._root, 0, [], []
        if n and tuple(tokens[:g]) not in self._root.children:
            return pages, node, hosted     # a miss at the first page: no copy of the tokens
        tokens = tuple(tokens[:n])
        while pos < n:
            child = node.children.get(tokens[pos:pos + g])
            if child is None or (child.host and not into_host):
                break
            m = common_pages(child.key, tokens, pos, self.page_size)
            if m < len(child.value):
                child = split(child, m, self.page_size)
            self._touch(child, now)
            if child.host:
                hosted.append(child)
            else:
                pages += child.value
            node, pos = child, pos + m * g
        return pages, node, hosted

    def _tick(self) -> int:
        self._clock += 1
        self._root.last_access = self._clock
        return self._clock

    def _touch(self, node: Node, now: int) -> None:
        node.last_access = now
        self._lru_of(node).push(node)

    def _lru_of(self, node: Node) -> LRU:
        return self._host_lru if node.host else self._lru

    def _count(self, node: Node, sign: int) -> None:
        """Adds node's pages to (sign +1) or takes them from (-1) the evictable counts."""
        if node.host:
            self._host_evictable += sign * len(node.value)
        else:
            self._evictable += sign * len(node.value)

    def _attach(self, parent: Node, leaf: Node) -> None:
        """A new device leaf under a device node (or the root)."""
        parent.children[leaf.key[:self.page_size]] = leaf
        self._leaves.discard(parent)
        self._leaves.add(leaf)
        self._lru.push(leaf)
        self._cached += len(leaf.value)
        self._evictable += len(leaf.value)

    def _host_room(self, num: int) -> bool:
        """Whether num host slots are free, once least-recently-used unlocked host leaves are
        dropped to make room (only if that suffices)."""
        if len(self._host_free) >= num:
            return True
        if len(self._host_free) + self._host_evictable < num:
            return False
        while len(self._host_free) < num:
            self._remove(self._host_lru.pop())
        return True

    def _to_host(self, leaf: Node) -> None:
        """Moves an unlocked device leaf's pages to free host slots."""
        slots = [self._host_free.pop() for _ in leaf.value]
        self._moves.append(HostMove("offload", leaf.value, slots))
        self._leaves.discard(leaf)
        self._cached -= len(slots)
        self._count(leaf, -1)
        leaf.value, leaf.host = slots, True
        self._count(leaf, +1)
        if not leaf.children:
            self._host_leaves.add(leaf)
            self._host_lru.push(leaf)
        parent = leaf.parent
        if parent is not self._root and all(c.host for c in parent.children.values()):
            self._leaves.add(parent)
            self._lru.push(parent)

    def _to_device(self, node: Node, pages: Sequence[int], op: str) -> None:
        """A host node (its parent on the device) now holds device `pages`; its slots are freed,
        logged as op ("load": copy them into the pages first, or "discard")."""
        self._moves.append(HostMove(op, pages if op == "load" else [], node.value))
        self._host_free += node.value
        if node.lock_count == 0:
            self._count(node, -1)
        node.value, node.host = [int(p) for p in pages], False
        if node.lock_count == 0:
            self._count(node, +1)
        self._cached += len(pages)
        self._host_leaves.discard(node)
        self._leaves.add(node)               # its children are host nodes
        self._lru.push(node)
        self._leaves.discard(node.parent)

    def _remove(self, node: Node) -> None:
        """Drops an unlocked node with every (host) node below it; their slots are discarded."""
        parent = node.parent
        del parent.children[node.key[:self.page_size]]
        stack, slots = [node], []
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            self._count(n, -1)
            if n.host:
                slots += n.value
                self._host_leaves.discard(n)
            else:
                self._cached -= len(n.value)
                self._leaves.discard(n)
            n.parent = None
        if slots:
            self._moves.append(HostMove("discard", [], slots))
            self._host_free += slots
        if parent is self._root:
            return
        if parent.host and not parent.children:
            self._host_leaves.add(parent)
            self._host_lru.push(parent)
        elif not parent.host and all(c.host for c in parent.children.values()):
            self._leaves.add(parent)
            self._lru.push(parent)
