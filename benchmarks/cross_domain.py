"""Cross-domain calibration: thresholds calibrated on one domain, used on another.

The shipped model is calibrated on code (the standard library's calibration split) and on English prose (the
documentation topics of ``pydoc_data``, half of them; :func:`sparse_attention.recipes.data.prose_texts`) and
measured on the held-out part of each domain with either set of thresholds. The cost of calibrating out of domain is
the perplexity with the other domain's thresholds over the perplexity with the same domain's, minus one, per
(evaluation domain, method, k). Writes ``benchmarks/results/cross_domain.json`` after every measurement.

    python benchmarks/cross_domain.py [--model shipped|condensed|PATH] [--k 4,16] [--windows 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DOMAINS = ("code", "prose")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shipped", help="shipped, condensed or a checkpoint folder")
    parser.add_argument("--k", default="4,16")
    parser.add_argument("--methods", nargs="+",
                        default=["top-theta pre exact", "top-theta pre exact vmc", "top-theta post vmc"])  # fmt: skip
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens per domain")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "cross_domain.json")
    args = parser.parse_args()

    import sparse_attention as sa
    from sparse_attention.ops.files import write_text
    from sparse_attention.recipes.data import prose_texts
    from sparse_attention.recipes.report import provenance
    from sparse_attention.recipes.sweep import check_methods, sweep

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    source = {"shipped": sa.DEFAULT_MODEL_DIR, "condensed": sa.CONDENSED_MODEL_DIR}.get(args.model, args.model)
    model, tok = sa.load_model_and_tokenizer(source)
    ks = [int(k) for k in args.k.split(",")]
    methods = [m for m in check_methods(args.methods) if m not in ("dense", "top-k")]
    corpus = {"code": sa.stdlib_texts, "prose": prose_texts}
    windows = {
        domain: {
            "calibration": sa.token_windows(tok, corpus[domain]("calibration"), 512, args.calib_windows),
            "heldout": sa.token_windows(tok, corpus[domain]("heldout"), 512, args.windows),
        }
        for domain in DOMAINS
    }
    result = {
        "kind": "cross-domain calibration",
        **provenance(),
        "device": "cpu",
        "torch_threads": args.threads,
        "model": str(source),
        "settings": {
            "ks": ks,
            "methods": methods,
            "seq_len": 512,
            "dense_layers": [0, 1],
            "sigma": 0.1,
            "prompt_len": 64,
            "num_prompts": 4,
            "new_tokens": 32,
            "windows": {d: {s: int(w.shape[0]) for s, w in parts.items()} for d, parts in windows.items()},
            "corpora": {
                "code": "stdlib calibration / heldout splits (recipes.data.stdlib_texts)",
                "prose": "pydoc_data topics, split by name hash (recipes.data.prose_texts)",
            },
        },  # fmt: skip
        "records": [],
    }

    def save() -> None:
        result["wall_seconds"] = time.perf_counter() - start
        write_text(args.out, json.dumps(result, indent=1) + "\n")

    finished: list[dict] = []
    for evaluated in DOMAINS:
        dense: list[dict] = []  # measured once per evaluation domain: dense attention needs no calibration
        for calibrated in (evaluated, *[d for d in DOMAINS if d != evaluated]):

            def tagged(records, evaluated=evaluated, calibrated=calibrated, dense=dense) -> list[dict]:
                return [
                    {**r, "eval_corpus": evaluated, "calib_corpus": None if r["method"] == "dense" else calibrated}
                    for r in records[len(dense) :]
                ]

            def keep(records, tagged=tagged) -> None:
                result["records"] = finished + tagged(records)
                save()

            records = sweep({"shipped": model}, windows[evaluated]["heldout"], windows[calibrated]["calibration"],
                            original="shipped", ks=ks, methods=methods, dense_layers=(0, 1), done=dense,
                            on_record=keep)  # fmt: skip
            finished.extend(tagged(records))
            dense[:] = [r for r in records if r["method"] == "dense"]
    # The cost of calibrating out of domain, per (evaluation domain, method, k).
    ppl = {(r["eval_corpus"], r["calib_corpus"], r["method"], r["k"]): r for r in result["records"]}
    summary = []
    for (evaluated, calibrated, method, k), r in sorted(ppl.items(), key=str):
        if method == "dense" or calibrated == evaluated:
            continue
        same = ppl[(evaluated, evaluated, method, k)]
        summary.append({
            "eval_corpus": evaluated, "calib_corpus": calibrated, "method": method, "k": k,
            "ppl_in_domain": same["ppl"], "ppl_cross_domain": r["ppl"], "extra_ppl": r["ppl"] / same["ppl"] - 1.0,
            "kept_element_fraction_pruned": [same["kept_element_fraction_pruned"], r["kept_element_fraction_pruned"]],
            "kept_v_fraction_pruned": [same["kept_v_fraction_pruned"], r["kept_v_fraction_pruned"]],
        })  # fmt: skip
    result["summary"] = summary
    result["max_extra_ppl"] = max(s["extra_ppl"] for s in summary)
    save()
    for s in summary:
        print(
            f"eval {s['eval_corpus']:<5} calib {s['calib_corpus']:<5} {s['method']:<25} k={s['k']:<3} "
            f"ppl {s['ppl_in_domain']:.3f} -> {s['ppl_cross_domain']:.3f} ({100 * s['extra_ppl']:+.2f} %)"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
