"""Condensation recipes of the shipped model, measured: each run's front of perplexity against kept work.

Each run fine-tunes the shipped default model by one :class:`~sparse_attention.recipes.condense.Recipe` (training
logic lives in ``sparse_attention.recipes``; this script only measures), then sweeps it
(:func:`sparse_attention.recipes.sweep.sweep`) on the same held-out windows as the shipped model itself, which is
measured first and is every run's quality target. A run with ``lam=0`` is the control: the same fine-tune without the
regularizer. Results go to ``benchmarks/results/condensation_recipe.json`` after every measurement; a second call
with the same settings resumes, skipping the runs already there. Each run's checkpoint can be kept (``--save-dir``).

    python benchmarks/condensation_recipe.py --run control:lam=0 --run lam1_k8:lam=1,k=8 [--steps 150] ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
KIND = "condensation recipe sweep"
# What a --run does not say. Fixed here (not the shipped recipe, which changes) so that a recorded command means the
# same runs later on.
BASE = dict(lam=1.0, k=8, distill=1.0, steps=150, lr=2e-4, batch_size=8, seq_len=256, warmup=20, kind="logmass", seed=0)


def parse_run(text: str) -> tuple[str, dict]:
    """``NAME:field=value,field=value`` (fields of Recipe) → (name, overrides)."""
    from sparse_attention.recipes.condense import Recipe

    name, _, spec = text.partition(":")
    types = {f.name: f.type for f in fields(Recipe)}
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in types or key == "dense_layers":
            raise argparse.ArgumentTypeError(f"--run {text!r}: unknown recipe field {key!r}")
        overrides[key] = {"int": int, "float": float, "str": str}[types[key]](value)
    if not name:
        raise argparse.ArgumentTypeError(f"--run {text!r}: give it a name, NAME:field=value,...")
    return name, overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True, help="NAME:field=value,...")
    parser.add_argument("--steps", type=int, default=None, help="steps of every run without its own (default 150)")
    parser.add_argument("--k", default="2,4,8,16,32,64", help="ks of each run's front")
    parser.add_argument("--methods", nargs="+", default=["top-k", "top-theta pre exact", "top-theta post vmc"])
    parser.add_argument("--windows", type=int, default=16, help="held-out windows of 512 tokens")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: more lose to contention)")
    parser.add_argument("--save-dir", type=Path, default=None, help="keep each run's checkpoint under this folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "condensation_recipe.json")
    args = parser.parse_args()

    import sparse_attention as sa
    from sparse_attention.ops.files import write_folder, write_text
    from sparse_attention.recipes import data
    from sparse_attention.recipes.condense import Recipe, heldout_topk_mass, summarize, train_condensed
    from sparse_attention.recipes.report import provenance
    from sparse_attention.recipes.sweep import check_methods, fronts, sweep

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ks = [int(k) for k in args.k.split(",")]
    methods = check_methods(["dense", *args.methods])
    tok = sa.load_default_tokenizer()
    heldout = sa.token_windows(tok, sa.stdlib_texts("heldout"), 512, args.windows)
    calibration = sa.token_windows(tok, sa.stdlib_texts("calibration"), 512, args.calib_windows)
    train = data.token_stream(tok, sa.stdlib_texts("train"))
    settings = {
        "ks": ks,
        "methods": list(methods),
        "seq_len": 512,
        "heldout_windows": int(heldout.shape[0]),
        "calibration_windows": int(calibration.shape[0]),
        "heldout_sha256": hashlib.sha256(heldout.numpy().tobytes()).hexdigest(),
        "prompt_len": 64,
        "num_prompts": 4,
        "new_tokens": 32,
        "dense_layers": [0, 1],
        "mass_windows": int(heldout.shape[0]),
    }
    result = {"kind": KIND, **provenance(), "device": "cpu", "torch_threads": args.threads, "settings": settings,
              "shipped": {}, "runs": []}  # fmt: skip
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        if previous.get("kind") != KIND or previous.get("settings") != settings:
            raise SystemExit(f"{args.out} holds results with other settings; choose another --out")
        result["shipped"], result["runs"] = previous["shipped"], previous["runs"]
        result["earlier_wall_seconds"] = previous.get("wall_seconds", 0.0) + previous.get("earlier_wall_seconds", 0.0)
        names = [r["name"] for r in result["runs"]]
        first = {"command": previous["command"], "commit": previous["commit"], "runs": names}
        result["invocations"] = previous.get("invocations") or [first]
    # Every call of this script that measured something: its command, commit and the runs it measured.
    result.setdefault("invocations", []).append({"command": result["command"], "commit": result["commit"], "runs": []})

    def save() -> None:
        result["wall_seconds"] = time.perf_counter() - start
        write_text(args.out, json.dumps(result, indent=1) + "\n")

    common = dict(ks=ks, methods=methods, dense_layers=(0, 1), progress=True)
    shipped_model = sa.load_default_model()
    if not result["shipped"].get("records") or len(result["shipped"]["records"]) < 1 + len(ks) * (len(methods) - 1):

        def keep_shipped(records) -> None:
            result["shipped"]["records"] = records
            save()

        sweep({"shipped": shipped_model}, heldout, calibration, original="shipped",
              done=result["shipped"].get("records", []), on_record=keep_shipped, **common)  # fmt: skip
        result["shipped"]["topk_mass"] = {str(k): heldout_topk_mass(shipped_model, heldout, k, (0, 1)) for k in ks}
        result["shipped"]["front"] = fronts(result["shipped"]["records"])
        save()
    shipped_dense = [r for r in result["shipped"]["records"] if r["method"] == "dense"]

    for name, overrides in args.run:
        recipe = Recipe(**{**BASE, **({"steps": args.steps} if args.steps else {}), **overrides})
        entry = next((r for r in result["runs"] if r["name"] == name), None)
        if entry is not None and entry["recipe"] != recipe.to_dict():
            raise SystemExit(f"run {name!r} is already in {args.out} with another recipe; rename it")
        if entry is not None and entry.get("complete"):
            print(f"{name}: already measured", flush=True)
            continue
        print(f"{name}: {recipe}", flush=True)
        model = sa.load_default_model(attn_implementation="sdpa")
        history, seconds = train_condensed(recipe, model, tok, train, progress=False)
        model.set_attn_implementation("eager")
        entry = {"name": name, "recipe": recipe.to_dict(), "train_seconds": seconds, "train": summarize(history)}
        result["invocations"][-1]["runs"].append(name)
        entry["topk_mass"] = {str(k): heldout_topk_mass(model, heldout, k, (0, 1)) for k in ks}
        print(f"{name}: trained in {seconds:.0f} s; {json.dumps(entry['train'])}", flush=True)
        result["runs"] = [r for r in result["runs"] if r["name"] != name] + [entry]
        save()
        if args.save_dir is not None:
            log = {"recipe": recipe.to_dict(), "train_seconds": seconds, "steps": [s.to_dict() for s in history]}

            def write_run(folder: Path, model=model, log=log) -> None:
                model.save_pretrained(folder)
                tok.save_pretrained(folder)
                (folder / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")

            write_folder(args.save_dir / name, write_run)
        eval_start = time.perf_counter()

        def keep(records, entry=entry) -> None:
            entry["records"] = [r for r in records if r["checkpoint"] != "shipped"]
            save()

        records = sweep({"shipped": shipped_model, name: model}, heldout, calibration, original="shipped",
                        dense_only={"shipped"}, done=shipped_dense, on_record=keep, **common)  # fmt: skip
        entry["eval_seconds"] = time.perf_counter() - eval_start
        entry["front"] = fronts([r for r in records if r["checkpoint"] == name])
        entry["complete"] = True
        save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
