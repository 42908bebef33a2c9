"""KV bytes one row holds at a context length when a model's sliding-window layers keep
window-sized KV (EngineConfig.local_kv "window": ring pools) against keeping every page
("full"), read off the shapes of the cache the engine would build (kvcache.init_cache under
jax.eval_shape: nothing is allocated, so it runs on any machine).

    python bench/window_kv.py --out bench/results/window-kv.json

A row's bytes: its pages of the page pool (every layer, or the global layers only) for the
context, plus its ring of each sliding-window layer: ceil((window - 1) / page) + 1 pages. The
engine also keeps scratch pages for the prompt chunks of one step (--max-prefill-rows chunks
of up to --chunked-prefill-size tokens), shared by all its rows: reported apart.
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
from flax import nnx

sys.path[0] = str(Path(__file__).resolve().parent.parent)    # the project, not bench/
import kvcache  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.shapes import ring_plan  # noqa: E402
from models.presets import PRESETS  # noqa: E402


def row_bytes(cfg, config: EngineConfig, context: int, kv_dtype: str) -> dict:
    """Bytes of a cache built for one row of `context` tokens, its trash pages and the ring
    pools' scratch pages (the engine's, shared by its rows: `scratch_bytes`) left out."""
    layers, ring, scratch = ring_plan(cfg, config, context)
    width = math.ceil(context / config.page_size)
    spec = kvcache.PoolSpec(cfg.num_layers - layers, 1 + width, config.page_size,
                            cfg.num_kv_heads, cfg.head_dim, kv_dtype)
    cache = jax.eval_shape(lambda: kvcache.init_cache(spec, 1, width, 0, layers, ring, scratch))
    layer_page = math.prod(spec.layer_struct.shape[1:]) * spec.layer_struct.dtype.itemsize
    trash = 2 * (len(cache.k) + len(cache.ring_k)) * layer_page
    shared = 2 * len(cache.ring_k) * scratch * layer_page
    return {"bytes": kvcache.nbytes((cache.k, cache.v, cache.ring_k, cache.ring_v)) - trash
            - shared, "scratch_bytes": shared, "ring_layers": layers, "ring_pages": ring,
            "pool_layers": len(cache.k)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-4b-random", choices=sorted(PRESETS))
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 16],
                    help="--chunked-prefill-size values (tokens a step feeds a row)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--kv-dtype", default="bfloat16")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cfg = nnx.eval_shape(lambda: PRESETS[args.model]()[0]).cfg
    rows = []
    for chunk in args.chunks:
        for context in args.contexts:
            base = EngineConfig(page_size=args.page_size, chunked_prefill_size=chunk)
            window = row_bytes(cfg, base, context, args.kv_dtype)
            full = row_bytes(cfg, dataclasses.replace(base, local_kv="full"), context,
                             args.kv_dtype)
            rows.append({"context": context, "chunked_prefill_size": chunk,
                         "window_bytes": window["bytes"], "full_bytes": full["bytes"],
                         "ratio": round(full["bytes"] / window["bytes"], 2),
                         "ring_pages": window["ring_pages"],
                         "scratch_bytes_shared": window["scratch_bytes"],
                         "ring_layers": window["ring_layers"],
                         "layers": cfg.num_layers})
            print(f"chunk {chunk:4d} context {context:7d}: {window['bytes'] / 2**20:8.1f} MiB "
                  f"window-sized vs {full['bytes'] / 2**20:8.1f} MiB every page "
                  f"({rows[-1]['ratio']}x less; ring of {window['ring_pages']} pages in "
                  f"{window['ring_layers']} of {cfg.num_layers} layers; "
                  f"{window['scratch_bytes'] / 2**20:.1f} MiB of scratch shared by all rows)")
    result = {"model": args.model, "page_size": args.page_size, "kv_dtype": args.kv_dtype,
              "sliding_window": cfg.sliding_window, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
