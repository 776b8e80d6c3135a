#!/usr/bin/env python3
"""Label-efficiency study: fine-tune from pre-training vs from scratch with few and many labelled cases.

For each number of labelled cases (nested subsets of the training cases, drawn once with a fixed
seed) and each init, one `hybridmim finetune` run with the same recipe (same steps, crops and
validation set); the best validation Dice of each run is the result. Finished runs are skipped and
interrupted ones resumed, so the study can be spread over several sessions or machines.

  scripts/label_efficiency.py --train TRAIN --val VAL -o DIR [--sizes 3 10 35]
      [--inits ct-hybridmim-cnn scratch] [--recipe scripts/recipes/label-efficiency-sarcoma.json]
      [--epochs N] [--max-minutes M] [--seeds 0 1 2] [--device auto|cpu|cuda]

TRAIN and VAL: dataset folders (scripts/link_datasets.py) or folders prepared with
`hybridmim finetune --prepare-only`. Arms may run side by side, one process per --sizes/--inits
pair, each with the same --max-minutes: they share the machine, so each keeps about the same number
of epochs (the steps each ran are in its result); a last run over all arms writes the summary.
Writes DIR/label_efficiency.json and .png (best and last-epoch Dice), and one model, curve and log per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hybridmim.atomic import atomic_output
from hybridmim.errors import UserError
from hybridmim.progress import Reporter
from hybridmim.training.finetune import load_recipe, run_finetune
from hybridmim.runfiles import state_path
from hybridmim.volumes import INDEX_NAME, find_cases, is_prepared_folder

REPO = Path(__file__).resolve().parents[1]


def case_names(folder: Path) -> list[str]:
    if is_prepared_folder(folder):
        return [v["name"] for v in json.loads((folder / INDEX_NAME).read_text())["volumes"]]
    return [case.name for case in find_cases([folder], labelled=True)]


def nested_subsets(names: list[str], sizes: list[int], seed: int = 0) -> dict[int, list[str]]:
    """{size: the first ``size`` cases of one seeded shuffle}: each subset holds the smaller ones."""
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    return {size: sorted(order[:size]) for size in sizes}


def seeded_recipe(recipe: Path, seed: int, folder: Path) -> Path:
    """The recipe with its training seed (initial weights, crops, augmentations) set, written into ``folder``."""
    merged = load_recipe(str(recipe.resolve()))  # its labels file named by an absolute path now
    merged["train"] = {**merged.get("train", {}), "seed": seed}
    path = folder / f"recipe-seed{seed}.json"
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(merged, indent=1))
    return path


def run_arm(init: str, cases: list[str], all_cases: list[str], seed: int, args, folder: Path) -> dict:
    model = folder / f"{Path(init).stem}-{len(cases)}{f'-seed{seed}' if seed else ''}.safetensors"
    result_file = model.with_suffix(".result.json")
    if result_file.is_file():
        return json.loads(result_file.read_text())
    resume = state_path(model).is_file()
    with open(model.with_suffix(".log.jsonl"), "a", encoding="utf-8") as log:
        outputs = run_finetune(init, [str(args.train)], str(model), Reporter("json", log), val_paths=[str(args.val)],
                               epochs=None if resume else args.epochs,
                               recipe_file=None if resume else str(seeded_recipe(args.recipe, seed, folder)),
                               resume=resume, overwrite=not resume, cache=str(folder / "cache"), device=args.device,
                               exclude=sorted(set(all_cases) - set(cases)),
                               max_minutes=None if resume else args.max_minutes)
    if outputs["stopped"]:
        raise SystemExit(f"{model.name}: stopped at step {outputs['step']}; run again to resume")
    history = [json.loads(line) for line in open(model.with_suffix(".log.jsonl"), encoding="utf-8")]
    dice_by_epoch = [e["dice"] for e in history if e.get("event") == "metric" and "dice" in e]
    result = {"init": init, "labelled_cases": len(cases), "seed": seed, "cases": cases,
              "best_dice": outputs["best_dice"], "best_epoch": outputs["best_epoch"], "steps": outputs["step"],
              "dice_by_epoch": dice_by_epoch}
    with atomic_output(result_file) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    return result


def plot(results: list[dict], path: Path, title: str) -> None:
    """Best and last-epoch Dice against labelled cases per init: the mean over seeds, their range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readings = {"best epoch": ("o-", 1.0, lambda r: r["best_dice"]),
                "last epoch": ("s--", 0.6, lambda r: r["dice_by_epoch"][-1])}
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for colour, init in enumerate(dict.fromkeys(r["init"] for r in results)):
        sizes = sorted({r["labelled_cases"] for r in results if r["init"] == init})
        for reading, (style, alpha, value) in readings.items():
            runs = [[value(r) for r in results if r["init"] == init and r["labelled_cases"] == n] for n in sizes]
            means = [float(np.mean(v)) for v in runs]
            spread = [[m - min(v) for m, v in zip(means, runs)], [max(v) - m for m, v in zip(means, runs)]]
            ax.errorbar(sizes, means, yerr=spread, fmt=style, color=f"C{colour}", alpha=alpha, capsize=3,
                        label=f"{init}: {reading}")
    ax.set_xscale("log")
    ax.minorticks_off()  # the log axis would label 4, 6, 20, 30 as powers of ten
    ticks = sorted({r["labelled_cases"] for r in results})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("labelled training cases")
    seeds = len({r.get("seed", 0) for r in results})
    ax.set_ylabel("mean validation Dice" + (f" (mean of {seeds} seeds)" if seeds > 1 else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 10, 35])
    parser.add_argument("--inits", nargs="+", default=["ct-hybridmim-cnn", "scratch"])
    parser.add_argument("--recipe", type=Path, default=REPO / "scripts/recipes/label-efficiency-sarcoma.json")
    parser.add_argument("--epochs", type=int, help="overrides the recipe (every arm alike)")
    parser.add_argument("--max-minutes", type=float, help="time limit per arm: the epochs that fit (every arm alike)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="training seeds: each arm once per seed (the labelled subsets stay the same)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    names = case_names(args.train)
    if max(args.sizes) > len(names):
        raise SystemExit(f"error: {args.train} has {len(names)} cases; --sizes asks for {max(args.sizes)}")
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    for size, cases in nested_subsets(names, args.sizes).items():
        for init in args.inits:
            for seed in args.seeds:
                result = run_arm(init, cases, names, seed, args, args.output)
                print(f"{init:<20} {size:>3} cases, seed {seed}: best validation Dice {result['best_dice']:.3f} "
                      f"(epoch {result['best_epoch']})", flush=True)
                results.append(result)
    summary = {"recipe": json.loads(args.recipe.read_text()), "epochs_override": args.epochs,
               "max_minutes": args.max_minutes, "seeds": args.seeds,
               "train": str(args.train), "validation": case_names(args.val), "results": results}
    with atomic_output(args.output / "label_efficiency.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    plot(results, args.output / "label_efficiency.png", "Sarcoma CT: pre-trained vs scratch, same budget")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # a missing init model, unreadable data: one line, as the CLI says it
        raise SystemExit(f"error: {error}") from None
