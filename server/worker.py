"""The engine's side of the pipe (server.bridge has the server's): the process that runs one
Engine, takes requests, aborts and calls between steps, steps while there is work, and sends
each step's new tokens with the engine's statistics."""

import logging
import os
import pickle
import signal
import time
from collections.abc import Callable

from engine.request import Request

log = logging.getLogger("hybridkv")

# An engine that fails this many times in a row (each recovery followed by another failure,
# with no launch between them that succeeded) exits, for the supervisor to restart it.
MAX_RECOVERIES_IN_A_ROW = 3
# While programs compile in the background, an idle engine sends its statistics this often.
IDLE_STATS_S = 1.0


def engine_process(start: Callable, conn) -> None:
    # Ctrl-C reaches the whole process group: the server shuts the engine down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = start()
    except BaseException as e:   # noqa: BLE001 - the server reports it
        try:
            pickle.dumps(e)
        except Exception:        # noqa: BLE001 - e.g. an exception with extra init arguments
            e = RuntimeError(f"{type(e).__name__}: {e}")
        conn.send(("failed", e))
        return
    conn.send(("ready", engine.front))
    try:
        EngineLoop(engine, conn).run()
    except (EOFError, OSError):
        pass                     # the server went away
    except BaseException as e:   # noqa: BLE001 - the server must hear of it
        log.exception("the engine failed")
        conn.send(("error", f"{type(e).__name__}: {e}"))
    # Gone at once: a normal exit would first wait for the background compile in progress
    # (engine.programs; ~10 s on the H200), holding the device's memory, which an engine
    # started next needs (on the H200 a new 8B engine aborted while an old one waited so).
    logging.shutdown()
    os._exit(0)


class EngineLoop:
    """Takes messages between steps, steps while there is work, and sends each step's new
    tokens with the engine's statistics. An exception in an engine call (a device error in a
    launch, say) goes to Engine.recover, which fails the requests it hit; the loop goes on,
    unless it fails MAX_RECOVERIES_IN_A_ROW times with no step between that worked."""

    def __init__(self, engine, conn):
        self.engine, self.conn = engine, conn
        self.sent: dict[str, int] = {}        # tokens sent so far, per running request
        self.failures = 0                     # recoveries since the last step that worked

    def run(self) -> None:
        engine = self.engine
        while True:
            if engine.has_work():
                wait = 0.0
            else:        # idle until a message arrives or an elastic pool's shrink is due
                wait = self._guarded(engine.maintain)
                if engine.runner.programs.pending():   # /metrics follows the compile thread
                    wait = IDLE_STATS_S if wait is None else min(wait, IDLE_STATS_S)
                self.conn.send(("step", [], None, engine.stats()))
            if not self._drain(wait):
                return
            if engine.has_work():
                start = time.perf_counter()
                advanced = self._guarded(engine.step)
                seconds = time.perf_counter() - start
                if advanced is not None:
                    self.failures = 0
                    self.conn.send(("step", self._updates(advanced), seconds, engine.stats()))

    def _guarded(self, call, *args):
        """call(*args), or, if it raises, the engine's recovery: the requests it failed are
        sent at once, and None is returned."""
        try:
            result = call(*args)
        except Exception as e:   # noqa: BLE001 - a device error fails requests, not the engine
            self.failures += 1
            if self.failures > MAX_RECOVERIES_IN_A_ROW:
                raise
            log.exception("an engine call failed; failing the requests it held")
            updates = self._updates(self.engine.recover(e))
            self.conn.send(("step", updates, None, self.engine.stats()))
            return None
        return result

    def _drain(self, wait: float | None) -> bool:
        """Handles the messages waiting (the first after up to `wait` seconds; None: until one
        comes); False on ("stop",)."""
        updates = []
        while self.conn.poll(wait):
            wait = 0.0
            message = self.conn.recv()
            kind = message[0]
            if kind == "add":
                req = message[1]
                if req.rid in self.sent:
                    req.finish_reason, req.error = "error", f"request id {req.rid!r} is in use"
                    updates.append((req.rid, (), None, "error", _meta(req), None))
                    continue
                try:
                    self.engine.add(req)
                except ValueError as e:     # its grammar did not compile here, say
                    req.finish_reason, req.error = "error", str(e)
                    updates.append((req.rid, (), None, "error", _meta(req), None))
                    continue
                self.sent[req.rid] = 0
            elif kind == "abort":
                rid = message[1]
                req = self.engine.requests.get(rid)
                self._guarded(self.engine.abort, rid)
                if self.sent.pop(rid, None) is not None and req is not None:
                    updates.append((rid, (), None, "abort", _meta(req), None))
            elif kind == "call":
                _, key, method = message
                try:
                    result = (key, True, getattr(self.engine, method)())
                except Exception as e:   # noqa: BLE001 - handed to the caller
                    result = (key, False, RuntimeError(f"{method}: {e}"))
                self.conn.send(("result", *result))
            elif kind == "stop":
                return False
        if updates:
            self.conn.send(("step", updates, None, self.engine.stats()))
        return True

    def _updates(self, advanced) -> list[tuple]:
        out = []
        for req in advanced:
            sent = self.sent.get(req.rid)
            if sent is None:
                continue
            new = tuple(req.output[sent:])
            logprobs = req.logprobs[sent:] if req.params.logprobs is not None else None
            # The prompt's are all in once its first token is: they ride with that update.
            prompt = req.prompt_logprobs if sent == 0 and new else None
            meta = None
            if req.finish_reason is not None:
                del self.sent[req.rid]
                meta = _meta(req)
            else:
                self.sent[req.rid] = len(req.output)
            out.append((req.rid, new, logprobs, req.finish_reason, meta, prompt))
        return out


def _meta(req: Request) -> tuple:
    return req.layout, req.cached_tokens, req.host_cached_tokens, req.error
