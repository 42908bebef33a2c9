"""Every environment variable hybridkv reads, read here once (this module imports no JAX)."""

import os

# Attention implementation everywhere (kernels.IMPLEMENTATIONS); LLM(attention_impl=...) and
# serve.py --attention-impl override it.
ATTENTION = os.environ.get("HYBRIDKV_ATTENTION", "auto")

# The API key the server requires (serve.py --api-key overrides it); unset: no key.
API_KEY = os.environ.get("HYBRIDKV_API_KEY") or None

# Allows a context_length above the model's max_position_embeddings (positions past what it was
# trained on: rope simply continues); unset, such a context_length is refused.
ALLOW_LONGER_CONTEXT = os.environ.get("HYBRIDKV_ALLOW_LONGER_CONTEXT", "").lower() in (
    "1", "true", "yes")
