"""Decode E2E test MRs with an exported model and score them with the five E2E metrics.

    python -m splitlora_ds.evaluate --model OUT --data testset.csv --out results.json

The CSV is the canonical E2E format (`mr,ref`, one row per reference); every distinct MR is
decoded once, in the order MRs first appear, and scored against all of its references. The
hypotheses are written next to the results (`results.hyp.txt`), one line per MR, so that
`python -m splitlora_ds.evaluate.metrics --hyp ... --refs ...` can rescore them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..errors import ConfigError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitlora_ds.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by splitlora_ds.export (adapter or --merge)")
    p.add_argument("--data", required=True, help="E2E CSV with mr,ref columns")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--hyp-out", help="hypotheses file (default: next to --out, .hyp.txt)")
    p.add_argument("--beams", type=int, default=1, help="beam size (1: greedy)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram", type=int, default=0, help="no-repeat n-gram size (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="decode only the first N MRs")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--metrics-impl", default="auto", choices=("auto", "jar", "python"),
                   help="tokenizer and METEOR: the official jars (needs Java), their Python ports, "
                        "or auto: the jars when Java is found (default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from .generate import generate, load_model
        from .java import resolve_impl
        from .metrics import load_references, score

        for flag, value in (("--beams", args.beams), ("--max-new-tokens", args.max_new_tokens),
                            ("--batch-size", args.batch_size)):
            if value < 1:
                raise ConfigError(f"{flag}: {value} is invalid; must be >= 1")
        resolve_impl(args.metrics_impl, field="--metrics-impl")  # before decoding, not after
        mrs, references = load_references(args.data, field="--data")
        if args.limit:
            mrs, references = mrs[:args.limit], references[:args.limit]
        model, tokenizer = load_model(args.model, args.device)
    except ConfigError as e:
        print(f"splitlora_ds: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    hypotheses = generate(model, tokenizer, mrs, num_beams=args.beams, length_penalty=args.length_penalty,
                          no_repeat_ngram_size=args.no_repeat_ngram, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    hyp_path = Path(args.hyp_out) if args.hyp_out else out.with_suffix(".hyp.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    hyp_path.write_text("".join(h + "\n" for h in hypotheses))
    results = {**score(hypotheses, references, impl=args.metrics_impl), "num_mrs": len(mrs), "decode_seconds": round(seconds, 2),
               "hypotheses": str(hyp_path), "model": args.model, "data": args.data,
               "decoding": {"beams": args.beams, "length_penalty": args.length_penalty,
                            "no_repeat_ngram": args.no_repeat_ngram, "max_new_tokens": args.max_new_tokens}}
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results[k] for k in ("bleu", "nist", "meteor", "rouge_l", "cider")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
