"""The engine process's loop (server.worker): a call that raises is recovered from, until
too many fail in a row."""

import pytest
from helpers import assert_pool_clean

from engine import LLM
from server.worker import MAX_RECOVERIES_IN_A_ROW, EngineLoop


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-random", dtype="float32", page_size=4, context_length=128,
               max_running_requests=2)


def test_the_engine_loop_gives_up_after_failures_in_a_row(llm):
    """The engine's process recovers from MAX_RECOVERIES_IN_A_ROW failures with no step that
    worked between them, then lets the next one end it (for the server to restart it)."""
    class Conn:
        sent = []

        def send(self, message):
            self.sent.append(message)

    loop = EngineLoop(llm.engine, Conn())

    def fail():
        raise RuntimeError("INTERNAL: injected")
    for _ in range(MAX_RECOVERIES_IN_A_ROW):
        assert loop._guarded(fail) is None
    with pytest.raises(RuntimeError, match="injected"):
        loop._guarded(fail)
    assert_pool_clean(llm.engine)
