"""hybridkv command line: generate with the embedded default model or a HF checkpoint.

    python serve.py --prompt "Hello"                 # embedded tiny-random model (noise text)
    python serve.py --model /path/to/hf-checkpoint --prompt "Hello" --chat

Every flag is parsed here, before JAX starts its backend.
"""

import argparse
import json
import sys

from kernels import IMPLEMENTATIONS  # importing JAX does not start its backend


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="serve.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model and KV cache")
    m.add_argument("--model", default="tiny-random",
                   help="preset name or HF checkpoint directory (config.json, safetensors, "
                        "tokenizer.json)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on an accelerator, float32 on CPU")
    m.add_argument("--layout", default="hybrid", choices=["static", "paged", "hybrid"])
    m.add_argument("--static-max-tokens", type=int, default=2048,
                   help="hybrid: requests of at most this many tokens (prompt + max tokens) "
                        "reserve all their pages at admission; longer ones are paged")
    m.add_argument("--page-size", type=int, default=16, help="tokens per KV page (power of 2)")
    m.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV pool size in tokens (default: from --mem-fraction-static)")
    m.add_argument("--mem-fraction-static", type=float, default=0.9,
                   help="fraction of device memory for weights + KV pool")
    m.add_argument("--context-length", type=int, default=None,
                   help="max tokens per request (default: the model's max positions)")
    m.add_argument("--max-running-requests", type=int, default=32)
    m.add_argument("--attention-impl", default=None,
                   choices=IMPLEMENTATIONS,
                   help="attention kernels (default: $HYBRIDKV_ATTENTION, else auto: the "
                        "compiled kernel of the GPU/TPU backend, the jnp reference on CPU)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from engine import LLM, SamplingParams  # imports JAX: after the flags are read

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        llm = LLM(args.model, layout=args.layout, static_max_tokens=args.static_max_tokens,
                  dtype=args.dtype, page_size=args.page_size, max_model_len=args.context_length,
                  max_num_seqs=args.max_running_requests, max_total_tokens=args.max_total_tokens,
                  mem_fraction_static=args.mem_fraction_static,
                  attention_impl=args.attention_impl)
        if args.chat:
            outputs = llm.chat([[{"role": "user", "content": x}] for x in args.prompt], params)
        else:
            outputs = llm.generate(args.prompt, params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, out in zip(args.prompt, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "layout": out.layout}))
        else:
            print(f"{prompt!r} -> {out.text!r}  [{len(out.token_ids)} tokens, {out.layout}, "
                  f"{out.finish_reason}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
