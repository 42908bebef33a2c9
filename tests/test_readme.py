"""The README's Python snippets run as written, and the notebook loop agrees with LLM.generate."""

import re
from pathlib import Path

import numpy as np
from helpers import assert_pool_clean

from engine import SamplingParams

README = (Path(__file__).parent.parent / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_the_api_and_notebook_snippets():
    assert len(SNIPPETS) == 2


def test_api_snippet_runs():
    ns = {}
    exec(SNIPPETS[0], ns)
    assert len(ns["outputs"]) == 2 and len(ns["outputs"][1].token_ids) == 8
    assert_pool_clean(ns["llm"])


def test_notebook_loop_equals_generate():
    ns = {}
    exec(SNIPPETS[1], ns)
    llm, out, first = ns["llm"], np.asarray(ns["out"]), np.asarray(ns["first"])
    assert_pool_clean(llm)
    expected = llm.generate([[256, 72, 105], [256, 79, 107, 33]],
                            SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for row, result in enumerate(expected):
        assert [int(first[row]), *out[row].tolist()] == result.token_ids
