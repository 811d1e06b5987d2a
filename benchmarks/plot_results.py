"""Draw the benchmark results: one PNG of six panels and a Markdown summary table, next to the JSON records.

Panels: decode speedup over the best SDPA backend against the kept V-row fraction (with the ideal ``2 / (1 + f_v)``
and the 1.3x goal); decode bandwidth as a share of the measured copy bandwidth (goal 0.8); prefill speedup over
SDPA flash against the length, one line per main-loop variant (goals 1.2x sparse, 0.95x dense); prefill kept and
skipped-tile fractions; regularizer time against the length (fused, reference, SDPA forward + backward, floor); peak
memory against the length. Without regularizer records, the regularizer's panel shows the end-to-end records
(``kind`` "e2e": decode tokens/s of ``generate``, top_theta beside sdpa) instead.

Run: ``python benchmarks/plot_results.py [FILE_OR_DIR ...] [--out plots.png] [--summary summary.md]``; with no
inputs it reads ``benchmarks/results/*.json``. Files that are not results files are skipped with a warning.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import harness

PLOT_NAME = "plots.png"
SUMMARY_NAME = "summary.md"
FIGURE_SIZE = (18, 10)
DPI = 110
DECODE_GOAL = 1.3
BANDWIDTH_GOAL = 0.8
PREFILL_GOAL = 1.2
PREFILL_DENSE_GOAL = 0.95


def collect(inputs: list[str]) -> tuple[list[dict], list[Path]]:
    """Records of every results file among ``inputs`` (files or folders of ``*.json``), and the files read."""
    paths: list[Path] = []
    for item in inputs or [str(harness.RESULTS_DIR)]:
        p = Path(item)
        paths.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    records, used = [], []
    for path in paths:
        try:
            records.extend(harness.load_records(path))
            used.append(path)
        except (ValueError, OSError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
    return records, used


def _label_shape(r: dict, keys=("B", "Lk")) -> str:
    return " ".join(f"{k}={r['shape'][k]}" for k in keys)


def _empty(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)


def _decode_panels(ax_speed, ax_bw, records: list[dict]) -> None:
    decode = [r for r in records if r["kind"] == "decode"]
    if not decode:
        _empty(ax_speed, "decode")
        _empty(ax_bw, "decode bandwidth")
        return
    groups = defaultdict(list)
    for r in decode:
        groups[(r.get("source", "?"), r["dtype"], _label_shape(r))].append(r)
    for (source, dtype, label), rs in sorted(groups.items()):
        rs = sorted((r for r in rs if not r["dense_mode"]), key=lambda r: r["kept_v_fraction"])
        xs = [r["kept_v_fraction"] for r in rs]
        line = ax_speed.plot(xs, [r["speedup_vs_sdpa"] for r in rs], "o-", label=f"{source} {dtype} {label}")[0]
        ax_bw.plot(xs, [r.get("bandwidth_fraction") for r in rs], "o-", color=line.get_color(), label=label)
        dense = [r for r in groups[(source, dtype, label)] if r["dense_mode"]]
        for r in dense:
            ax_speed.plot([1.0], [r["speedup_vs_sdpa"]], "x", color=line.get_color(), markersize=9)
            ax_bw.plot([1.0], [r.get("bandwidth_fraction")], "x", color=line.get_color(), markersize=9)
    fv = [i / 100 for i in range(5, 101)]
    ax_speed.plot(fv, [2 / (1 + f) for f in fv], "k:", label="ideal 2/(1+f_v) over a dense kernel at the floor")
    ax_speed.axhline(DECODE_GOAL, color="red", linestyle="--", label=f"goal {DECODE_GOAL}x")
    ax_speed.axhline(1.0, color="grey", linewidth=0.5)
    ax_speed.set(title="decode: speedup over best SDPA (x = dense mode)", xlabel="kept V-row fraction f_v",
                 ylabel="SDPA ms / ours ms")  # fmt: skip
    ax_speed.legend(fontsize=7)
    ax_bw.axhline(BANDWIDTH_GOAL, color="red", linestyle="--", label=f"goal {BANDWIDTH_GOAL}")
    ax_bw.set(title="decode: bytes that must move / time, share of copy bandwidth", xlabel="kept V-row fraction f_v",
              ylabel="fraction of measured copy GB/s")  # fmt: skip
    ax_bw.legend(fontsize=7)


def _vs_flash(record: dict):
    """Prefill speedup over SDPA flash (the goals' yardstick); older records only have the preferred backend's."""
    return record.get("speedup_vs_sdpa_flash", record["speedup_vs_sdpa"])


def _prefill_panels(ax_speed, ax_frac, records: list[dict]) -> None:
    prefill = [r for r in records if r["kind"] == "prefill"]
    if not prefill:
        _empty(ax_speed, "prefill")
        _empty(ax_frac, "prefill kept / skipped")
        return
    groups = defaultdict(list)
    for r in prefill:
        s = r["shape"]
        groups[(r.get("source", "?"), r["dtype"], s["D"], s["Hq"], s["Hkv"], r.get("variant", ""))].append(r)
    for (source, dtype, d, hq, hkv, variant), rs in sorted(groups.items(), key=str):
        rs = sorted(rs, key=lambda r: r["shape"]["Lq"])
        xs = [r["shape"]["Lq"] for r in rs]
        style = "--" if rs[0]["dense_mode"] else "-"
        label = f"{source} {dtype} D={d} Hq={hq}/{hkv} {variant}"
        ax_speed.plot(xs, [_vs_flash(r) for r in rs], "o" + style, label=label)
        if not rs[0]["dense_mode"]:
            line = ax_frac.plot(xs, [r["kept_element_fraction"] for r in rs], "o-", label=f"kept: {label}")[0]
            ax_frac.plot(xs, [r["skipped_tile_fraction"] for r in rs], "s--", color=line.get_color(),
                         label=f"skipped tiles: {label}")  # fmt: skip
    ax_speed.axhline(PREFILL_GOAL, color="red", linestyle="--", label=f"goal {PREFILL_GOAL}x (sparse)")
    ax_speed.axhline(PREFILL_DENSE_GOAL, color="orange", linestyle="--", label=f"goal {PREFILL_DENSE_GOAL}x (dense)")
    ax_speed.set_xscale("log", base=2)
    ax_speed.set(title="prefill: speedup over SDPA flash (dashed = dense mode)", xlabel="tokens",
                 ylabel="SDPA ms / ours ms")  # fmt: skip
    ax_speed.legend(fontsize=6)
    ax_frac.set_xscale("log", base=2)
    ax_frac.set(title="prefill: kept element fraction and skipped P·V tile fraction", xlabel="tokens",
                ylabel="fraction")  # fmt: skip
    ax_frac.legend(fontsize=6)


def _regularizer_panel(ax, records: list[dict]) -> None:
    reg = sorted((r for r in records if r["kind"] == "regularizer"), key=lambda r: r["shape"]["Lq"])
    if not reg:
        _empty(ax, "regularizer")
        return
    xs = [r["shape"]["Lq"] for r in reg]
    for key, label, style in (("ms", "fused fwd+bwd", "o-"), ("ref_ms", "reference fwd+bwd", "s-"),
                              ("sdpa_ms", "SDPA fwd+bwd", "^-"), ("flex_ms", "flex fwd+bwd", "v-"),
                              ("floor_ms", "fused floor", "k:")):  # fmt: skip
        ys = [r.get(key) for r in reg]
        if any(y is not None for y in ys):
            ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title=f"regularizer (k={reg[0].get('top_k')}): time", xlabel="tokens", ylabel="ms")
    ax.legend(fontsize=7)


def _e2e_panel(ax, records: list[dict]) -> None:
    """Decode tokens/s of ``generate``, top_theta beside sdpa, one pair of bars per end-to-end record."""
    e2e = [r for r in records if r["kind"] == "e2e"]
    if not e2e:
        _empty(ax, "end to end")
        return
    labels, ours, sdpa = [], [], []
    for r in e2e:
        labels.append(f"{r['shape'].get('layers', '?')} layers, prompt {r['shape']['Lk']}")
        ours.append(r.get("tokens_per_s") or 0.0)
        sdpa.append(r.get("sdpa_tokens_per_s") or 0.0)
    xs = range(len(e2e))
    ax.bar([x - 0.2 for x in xs], sdpa, width=0.4, label="sdpa")
    ax.bar([x + 0.2 for x in xs], ours, width=0.4, label="top_theta")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set(title="end to end: HF generate decode tokens/s (eager loop)", ylabel="tokens / s")
    ax.legend(fontsize=7)


def _memory_panel(ax, records: list[dict]) -> None:
    series = defaultdict(list)
    for r in records:
        length = r["shape"]["Lk"]
        if r["kind"] == "regularizer":
            series["regularizer fused"].append((length, r.get("peak_mem_mb")))
            series["regularizer reference"].append((length, r.get("ref_peak_mem_mb")))
            series["SDPA fwd+bwd"].append((length, (r.get("sdpa_peak_mem_mb") or {}).get(r.get("sdpa_backend"))))
        elif r["kind"] == "prefill" and r.get("source") == "synthetic":
            tag = "dense" if r["dense_mode"] else "sparse"
            series[f"prefill ours {tag} {r['dtype']} D={r['shape']['D']}"].append((length, r.get("peak_mem_mb")))
    plotted = False
    for label, points in sorted(series.items()):
        points = sorted({p for p in points if p[1] is not None})
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
            plotted = True
    if not plotted:
        _empty(ax, "peak memory")
        return
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(title="peak memory beyond the inputs (O(L) is a slope of 1)", xlabel="tokens", ylabel="MiB")
    ax.legend(fontsize=6)


def plot(records: list[dict], path) -> Path:
    """Draw the six panels into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=FIGURE_SIZE)
    _decode_panels(axes[0, 0], axes[0, 1], records)
    _prefill_panels(axes[0, 2], axes[1, 0], records)
    if any(r["kind"] == "regularizer" for r in records) or not any(r["kind"] == "e2e" for r in records):
        _regularizer_panel(axes[1, 1], records)
    else:
        _e2e_panel(axes[1, 1], records)  # the first GPU run has no regularizer records
    _memory_panel(axes[1, 2], records)
    first = records[0] if records else {}
    fig.suptitle(
        f"{first.get('device', '?')} | torch {first.get('torch', '?')} | triton {first.get('triton', '?')} | "
        f"commit {str(first.get('commit', '?'))[:12]}"
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(records: list[dict]) -> str:
    """A Markdown table, one row per record."""
    head = ("| kind | src | dtype | shape | variant | kept | skipped | ms | SDPA ms | flex ms | floor ms | x SDPA | "
            "GB/s share | peak MiB | check |")  # fmt: skip
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in records:
        s = r["shape"]
        shape = f"B{s['B']} H{s['Hq']}/{s['Hkv']} L{s['Lq']}x{s['Lk']} D{s['D']}"
        kept = r.get(harness.KEPT_KEY[r["kind"]])
        lines.append(
            f"| {r['kind']} | {r.get('source', '')} | {r['dtype']} | {shape} | {r.get('variant', '')} | {_fmt(kept)} | "
            f"{_fmt(r['skipped_tile_fraction'])} | {_fmt(r['ms'], '.4f')} | {_fmt(r['sdpa_ms'], '.4f')} | "
            f"{_fmt(r['flex_ms'], '.4f')} | {_fmt(r['floor_ms'], '.4f')} | {_fmt(r['speedup_vs_sdpa'], '.2f')} | "
            f"{_fmt(r.get('bandwidth_fraction'), '.2f')} | {_fmt(r['peak_mem_mb'], '.1f')} | {r.get('check_ok')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", help="results JSON files or folders (default benchmarks/results)")
    parser.add_argument("--out", default=None, help=f"PNG path (default {PLOT_NAME} beside the first input)")
    parser.add_argument("--summary", default=None, help=f"Markdown table path (default {SUMMARY_NAME} beside it)")
    args = parser.parse_args(argv)
    records, used = collect(args.inputs)
    if not records:
        print("no benchmark records found", file=sys.stderr)
        return 1
    folder = used[0].parent
    table = summary_table(records)
    Path(args.summary or folder / SUMMARY_NAME).write_text(table)
    print(table)
    try:
        path = plot(records, args.out or folder / PLOT_NAME)
    except ImportError:
        print("matplotlib is not installed: no plot drawn (pip install matplotlib)", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
