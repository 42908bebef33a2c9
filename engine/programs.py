"""The compiled programs an engine launches, one per `Shape` (engine.shapes), and when each
compiles. A launch runs on the cheapest compiled program whose shape covers it (more rows,
longer chunks or more steps than it needs are padding), so where a covering program exists no
launch waits for a compiler. EngineConfig.precompile picks when programs compile:

- "background": `ahead` compiles the largest shapes (engine.shapes.Buckets.largest: three
  with the default flags, the top-k / top-p variants), one at a time, before the engine is
  ready; a thread then compiles the others, one at a time, while the engine serves, and
  launches move onto them as they land. On the H100 a shape took ~4-8 s to compile (BENCHMARKS
  "Start-up"), so a server is ready after three compiles instead of ~30-70.
- "all": every shape before ready (the old behaviour; the steadiest timings from the start).
- "none": a launch compiles its own shape when first met, on the request path (CPU tests,
  where compiles are quick and most shapes are never met). On a CPU, a step that ends its
  prompts also has the thread compile the decode loop expected after it, beside the step's
  own compile (ModelRunner.expect_loop: `serve.py --chat --prompt` on SmolLM2, cold, median
  19.4 s of seven runs against 23.9 s of five without, on a 2-core CPU; BENCHMARKS.md).

Programs compile ahead of time (`jit(...).trace(...).lower().compile()`) and are called
directly: a compiled program needs no arrays of its shape to exist, so the shapes of pool sizes
an elastic pool has not reached compile without their memory. Calling one costs about what a
jitted call does (~90 us either way for 200 arguments, measured on a CPU).
"""

import atexit
import collections
import logging
import threading
import weakref
from collections.abc import Callable, Iterable

import tqdm

from engine.config import PRECOMPILE
from engine.shapes import Shape

log = logging.getLogger("hybridkv")

_live: "weakref.WeakSet[Programs]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """A compile thread must not be inside XLA while the interpreter finalizes."""
    for programs in list(_live):
        programs.close()


class Programs:
    def __init__(self, compile: Callable[[Shape], object], mode: str):
        """compile(shape) -> the program (whatever the caller runs); mode as the module says."""
        assert mode in PRECOMPILE and mode != "auto", mode
        self.mode, self._compile = mode, compile
        self._compiled: dict[Shape, object] = {}
        self._pending: collections.deque[Shape] = collections.deque()
        self._compiling: set[Shape] = set()    # being compiled, by any thread
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._busy = False          # the thread is compiling one
        self._closed = False
        self.request_path_compiles = 0   # compiles a launch waited for
        _live.add(self)

    def __len__(self) -> int:
        return len(self._compiled)

    def pending(self) -> int:
        """Shapes queued for the compile thread or being compiled by it."""
        with self._cv:
            return len(self._pending) + self._busy

    def has(self, shapes: Iterable[Shape]) -> bool:
        return all(s in self._compiled for s in shapes)

    def get(self, need: Shape) -> tuple[Shape, object]:
        """(the shape to run need's launch as, its program): need's own if compiled, else
        (unless mode is "none") the cheapest compiled shape covering it; else need's, compiled
        now."""
        with self._cv:
            if need in self._compiled:
                return need, self._compiled[need]
            if self.mode != "none":
                best = min((s for s in self._compiled if s.covers(need)),
                           key=lambda s: s.cost, default=None)
                if best is not None:
                    return best, self._compiled[best]
        # Expected with "none" (a debug line); otherwise a launch no program covers.
        log.log(logging.DEBUG if self.mode == "none" else logging.WARNING,
                "compiling %s now: a launch waits for it", need)
        self.request_path_compiles += 1
        return need, self.compile(need)

    def compile(self, shape: Shape):
        """shape's program, compiled unless it is already; a shape that another thread is
        compiling is waited for, not compiled twice."""
        with self._cv:
            self._cv.wait_for(lambda: shape not in self._compiling)
            if shape in self._compiled:
                return self._compiled[shape]
            self._compiling.add(shape)
        try:
            program = self._compile(shape)
            with self._cv:
                self._compiled[shape] = program
        finally:
            with self._cv:
                self._compiling.discard(shape)
                self._cv.notify_all()
        return program

    def ahead(self, shapes: Iterable[Shape], progress: bool = True) -> None:
        """Compiles shapes now, one at a time, behind a progress bar."""
        todo = [s for s in dict.fromkeys(shapes) if s not in self._compiled]
        for shape in tqdm.tqdm(todo, desc="compiling step shapes", disable=not progress):
            self.compile(shape)

    def background(self, shapes: Iterable[Shape], first: bool = False) -> None:
        """Queues shapes for the compile thread (first: ahead of those queued before)."""
        with self._cv:
            new = [s for s in dict.fromkeys(shapes)
                   if s not in self._compiled and s not in self._pending]
            if first:
                self._pending.extendleft(reversed(new))
            else:
                self._pending.extend(new)
            if new and self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._work, name="hybridkv-compile",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def wait(self) -> None:
        """Returns once the compile thread has nothing left to do."""
        with self._cv:
            self._cv.wait_for(lambda: not (self._pending or self._busy) or self._closed)

    def close(self) -> None:
        """Stops the compile thread after the compile in progress."""
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _work(self) -> None:
        """The compile thread: compiles the queued shapes, then ends (`background` starts
        another when more come). A thread left waiting would hold the engine alive, its pool
        and compiled programs with it, for as long as the process runs."""
        while True:
            with self._cv:
                if self._closed or not self._pending:
                    self._thread = None
                    self._cv.notify_all()
                    return
                shape, self._busy = self._pending.popleft(), True
            try:
                self.compile(shape)
            except Exception:     # launches keep running on the shapes that did compile
                log.exception("compiling %s in the background failed", shape)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
