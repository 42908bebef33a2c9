"""What the pool holds, per layout: pages reserved, pages holding tokens, tokens, waste."""

import math

import numpy as np

from kvcache.page_table import LAYOUT_CODES, KVCache


def usage(cache: KVCache) -> dict:
    """Host-side report (one device->host copy of the small arrays; never call in the step).

    For each layout: rows, reserved_pages, used_pages (pages holding at least one token),
    tokens, waste_tokens (reserved but empty slots) and waste_bytes; plus pool totals.
    """
    g = cache.page_size
    num_pages, _, k_heads, head_dim = cache.k[0].shape
    bytes_per_token = 2 * len(cache.k) * k_heads * head_dim * cache.k[0].dtype.itemsize
    table = np.asarray(cache.page_table)
    lengths = np.asarray(cache.lengths)
    layout = np.asarray(cache.layout)
    report = {}
    for name, code in LAYOUT_CODES.items():
        rows = layout == code
        reserved = int(np.sum(table[rows] != 0))
        tokens = int(np.sum(lengths[rows]))
        used = int(sum(math.ceil(n / g) for n in lengths[rows]))
        waste = reserved * g - tokens
        report[name] = {"rows": int(rows.sum()), "reserved_pages": reserved,
                        "used_pages": used, "tokens": tokens, "waste_tokens": waste,
                        "waste_bytes": waste * bytes_per_token}
    report["pool"] = {"pages": num_pages - 1, "free_pages": int(cache.alloc.top),
                      "page_size": g, "bytes_per_token": bytes_per_token}
    return report
