"""Reports of jobs on a model: tables, plots and provenance (versions, commit, command), shared with benchmarks."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from ..ops.files import write_file

COMMIT_ENV = "SPARSE_ATTENTION_COMMIT"
UNKNOWN = "unknown"
# The source tree of an editable install (or a checkout); a wheel has no .git here and reports "unknown".
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = SOURCE_ROOT) -> str:
    """The commit of the code that runs: ``$SPARSE_ATTENTION_COMMIT`` when set (a GPU machine receives a copy of the
    working tree, usually without ``.git``), else ``git rev-parse HEAD`` of ``root`` (``-dirty`` appended when
    tracked files differ), else ``"unknown"``."""
    env = os.environ.get(COMMIT_ENV, "").strip()
    if env:
        return env
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return (head + "-dirty" if dirty else head) or UNKNOWN


def versions() -> dict:
    """torch, triton, transformers and Python versions (``"unknown"`` for a package that is missing)."""
    import torch

    found = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = UNKNOWN
    return found


def provenance(command: list[str] | None = None) -> dict:
    """What every result file records: versions, commit, the exact command and the processor."""
    argv = sys.argv if command is None else command
    return {
        **versions(),
        "commit": git_commit(),
        "command": shlex.join(argv),
        "processor": platform.processor() or platform.machine(),
    }


def format_table(records: list[dict]) -> str:
    """A fixed-width text table of the records (with a checkpoint column when they name more than one)."""

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    several = len({r.get("checkpoint") for r in records}) > 1
    names = ("kept", "kept*", "keptV", "keptV*", "kept/k")
    header = (f"{'checkpoint':<11} " if several else "") + f"{'method':<10} {'k':>4} {'ppl':>9} {'acc':>7} "
    header += " ".join(f"{n:>7}" for n in names)
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            (f"{r.get('checkpoint') or '-':<11} " if several else "")
            + f"{r['method']:<10} {fmt(r['k'], 'd'):>4} {r['perplexity']:>9.3f} {r['accuracy']:>7.4f} "
            f"{fmt(r['kept_fraction'], '.4f'):>7} {fmt(r['kept_fraction_pruned_layers'], '.4f'):>7} "
            f"{fmt(r['kept_v_fraction'], '.4f'):>7} {fmt(r['kept_v_fraction_pruned_layers'], '.4f'):>7} "
            f"{fmt(r['kept_per_k'], '.3f'):>7}"
        )
    lines.append("kept = prefill kept attention-element fraction (all layers), * = pruned layers only;")
    lines.append(
        "keptV = kept V-row fraction over generated decode steps; kept/k = kept count of rows longer than k / k."
    )
    return "\n".join(lines)


def plot(records: list[dict], path, title: str | None = None) -> bool:
    """Draw perplexity against kept fraction (PNG): one curve per (checkpoint, method), each checkpoint's dense
    perplexity as a line; written atomically. Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    checkpoints = list(dict.fromkeys(r.get("checkpoint") for r in records))
    styles, colors = ("-", "--", ":", "-."), plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, name in enumerate(checkpoints):
        mine = [r for r in records if r.get("checkpoint") == name]
        prefix = f"{name}: " if name is not None else ""
        for mi, (method, marker) in enumerate((("top-k", "s"), ("top-theta", "o"))):
            rs = [r for r in mine if r["method"] == method]
            if rs:
                xs = [r["kept_fraction_pruned_layers"] for r in rs]
                ax.plot(xs, [r["perplexity"] for r in rs], marker=marker, linestyle=styles[ci % len(styles)],
                        color=colors[mi], label=prefix + method)  # fmt: skip
                for r, x in zip(rs, xs, strict=True):
                    ax.annotate(f"k={r['k']}", (x, r["perplexity"]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7)  # fmt: skip
        dense = [r for r in mine if r["method"] == "dense"]
        if dense:
            ax.axhline(dense[0]["perplexity"], color="gray", linestyle=styles[ci % len(styles)],
                       label=prefix + "dense")  # fmt: skip
    ax.set_xlabel("kept attention-element fraction (pruned layers)")
    ax.set_ylabel("held-out perplexity")
    if title:
        import textwrap

        ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return True
