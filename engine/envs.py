"""Every environment variable hybridkv reads, read here once (this module imports no JAX)."""

import os

# Attention implementation everywhere (kernels.IMPLEMENTATIONS); LLM(attention_impl=...) and
# serve.py --attention-impl override it.
ATTENTION = os.environ.get("HYBRIDKV_ATTENTION", "auto")

# The API key the server requires (serve.py --api-key overrides it); unset: no key.
API_KEY = os.environ.get("HYBRIDKV_API_KEY") or None
