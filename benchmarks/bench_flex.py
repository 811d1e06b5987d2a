"""FlexAttention baselines for records already measured: fills ``flex_ms`` into decode and prefill results files.

Compiling FlexAttention takes 30-60 s per new shape on a GPU, so benchmarks/first_run.sh times every other number
first (``--no-flex``) and this script last: for each distinct shape of the given files, in the order they were
measured (taking the files in turn, so that the first shapes of each come first), it builds the same synthetic inputs
(``synthetic.structured_qkv`` with the record's seed), times compiled FlexAttention the way the harness times
everything (rotated input copies, CUDA-graph replay, ``do_bench`` median) and writes ``flex_ms``,
``speedup_vs_flex``, ``flex_error`` and ``timing["flex"]`` into every record of that shape, rewriting the file
(atomically) after each shape. A shape that cannot run records its error; no new shape starts after
``--time-budget`` seconds. Records of other kinds (regularizer, e2e) are left as they are.

Run: ``python benchmarks/bench_flex.py RESULTS.json [RESULTS.json ...] [--time-budget S] [--smoke]``.
"""

from __future__ import annotations

import argparse
import sys
from itertools import zip_longest

import harness
import synthetic

KINDS = ("decode", "prefill")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="results files of bench_decode.py / bench_prefill.py")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; no new shape starts after this")
    parser.add_argument("--smoke", action="store_true", help="allow a CPU (eager FlexAttention), for checking")
    parser.add_argument("--max-shapes", type=int, default=None, help="time at most this many shapes")
    parser.add_argument("--warmup-ms", type=float, default=harness.WARMUP_MS)
    parser.add_argument("--rep-ms", type=float, default=harness.QUICK_REP_MS)
    parser.add_argument("--no-graph", action="store_true", help="time eagerly instead of replaying CUDA graphs")
    return parser.parse_args(argv)


def shape_key(record: dict) -> tuple:
    """What FlexAttention's time depends on: kind (decode is not causal), dtype, shape, causality."""
    s = record["shape"]
    causal = record["kind"] == "prefill" and bool(record.get("causal", True))
    return (record["kind"], record["dtype"], s["B"], s["Hq"], s["Hkv"], s["Lq"], s["Lk"], s["D"], causal)


def ordered_shapes(tables: list[list[dict]]) -> list[tuple[int, tuple]]:
    """``(file index, shape key)`` for every distinct shape, the files taken in turn, each in measurement order."""
    per_file = []
    for i, records in enumerate(tables):
        keys = dict.fromkeys(shape_key(r) for r in records if r["kind"] in KINDS)
        per_file.append([(i, key) for key in keys])
    return [item for row in zip_longest(*per_file) for item in row if item is not None]


def _inputs(key: tuple, seed: int, device) -> synthetic.QKV:
    _, dtype_name, b, hq, hkv, lq, lk, d, _ = key
    dtype = harness.DTYPES[dtype_name]
    return synthetic.structured_qkv(b, hq, hkv, lk, d, num_queries=lq, dtype=dtype, device=device, seed=seed)


def time_shape(key: tuple, seed: int, args, device) -> tuple[float | None, str | None, str | None]:
    """``(ms, timing method, error)`` of compiled FlexAttention on one shape."""
    qkv = _inputs(key, seed, device)
    sets = harness.input_copies((qkv.query, qkv.key, qkv.value), harness.rotation_count(qkv.nbytes))
    timing, errors = {}, {}
    opts = dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, graph=not args.no_graph)
    causal = key[-1]
    ms = harness.try_time("flex", lambda: [harness.flex_call(*s, causal=causal) for s in sets], timing, errors, **opts)
    return ms, timing.get("flex"), errors.get("flex")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = harness.device_for(args)
    deadline = harness.Deadline(args.time_budget)
    writers = []
    for path in args.files:
        writer = harness.ResultWriter(path)
        try:
            writer.records = harness.load_records(path)
        except (OSError, ValueError) as exc:
            harness.log(f"skipping {path}: {exc}")
            writer.records = []
        writers.append(writer)
    done = 0
    for index, key in ordered_shapes([w.records for w in writers]):
        if deadline.expired() or (args.max_shapes is not None and done >= args.max_shapes):
            harness.log(f"time budget or --max-shapes spent: no FlexAttention for {key} and later shapes")
            break
        writer = writers[index]
        matching = [r for r in writer.records if r["kind"] in KINDS and shape_key(r) == key]
        seed = (matching[0].get("inputs") or {}).get("seed", 0)
        harness.log(f"flex {key}")
        ms, method, error = time_shape(key, seed, args, device)
        harness.release()  # the inputs of this shape are gone with time_shape's frame
        for record in matching:
            record["flex_ms"] = ms
            record["flex_error"] = error
            record["speedup_vs_flex"] = harness.ratio(ms, record["ms"])
            if method is not None:
                record.setdefault("timing", {})["flex"] = method
            harness.validate_record(record)
        writer.flush()
        done += 1
        harness.log(f"  flex_ms={ms} ({method or error}) for {len(matching)} records")
    harness.log(f"FlexAttention timed on {done} shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
