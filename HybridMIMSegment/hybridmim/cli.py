"""The ``hybridmim`` command line. Exit codes: 0 success, 2 bad input or usage
(one ``error: …`` line on stderr), 1 internal fault (with a traceback)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from contextlib import nullcontext
from typing import NoReturn

from . import __version__
from .atomic import output_lock
from .errors import UserError
from .progress import Reporter, edge_text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=["json", "tqdm", "quiet"], default="tqdm",
                        help="json: machine-readable progress lines on stdout (see docs/PROGRESS.md)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto (default): the GPU when torch sees one, else the CPU; cuda without a GPU "
                             "runs on the CPU and says so")


def _add_training_run_options(parser: argparse.ArgumentParser, prepare_only_help: str) -> None:
    """The options pre-training and fine-tuning share: resume, overwrite, the prepared-data cache, device."""
    parser.add_argument("--resume", action="store_true", help="continue the run that wrote -o from its resume state")
    parser.add_argument("--overwrite", action="store_true", help="start again, replacing an earlier run's files")
    parser.add_argument("--cache", metavar="DIR",
                        help="where prepared cases are kept (default ~/.cache/hybridmim/prepared)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NAME",
                        help="case names in --data to leave out (held-out cases, or to train on a subset)")
    parser.add_argument("--prepare-only", action="store_true", help=prepare_only_help)
    _add_device(parser)
    _add_progress(parser)


def _cmd_segment(args, reporter: Reporter) -> None:
    many_only = {"--format": args.format, "--previews": args.previews, "--skip-existing": args.skip_existing}
    if args.data and args.inputs:
        raise UserError("give the input files of one scan, or --data for many scans, not both")
    if not args.data and not args.inputs:
        raise UserError("give the input file(s) of the scan to segment, or --data for many scans")
    if args.data:
        if args.preview:
            raise UserError("--preview names one PNG; with --data, --previews draws one per case beside its label map")
        _segment_many(args, reporter)
        return
    if any(many_only.values()):
        raise UserError(f"{', '.join(k for k, v in many_only.items() if v)}: only with --data (many scans)")
    from .segment import segment

    outputs = segment(args.inputs, args.output, args.model, args.device, args.preview, args.overwrite, reporter)
    if reporter.mode == "tqdm":
        found = [s for s in outputs["segments"] if s["volume_ml"] > 0]
        print(f"wrote {outputs['segmentation']} ({len(found)} of {len(outputs['segments'])} segments found)"
              + (f" and {outputs['preview']}" if "preview" in outputs else ""), file=sys.stderr)
        cut = [f"{s['name']} ({edge_text(s['at_edge'])})" for s in found if s["at_edge"]]
        if cut:
            print(f"reaching the scan's edge, so perhaps cut off by it (their volumes then short of the whole): "
                  f"{', '.join(cut)}", file=sys.stderr)


def _segment_many(args, reporter: Reporter) -> None:
    from .batch import output_format, segment_cases

    suffix = output_format(args.format or "seg.nrrd")
    summary = segment_cases(args.data, args.output, args.model, args.device, suffix, args.previews, args.overwrite,
                            args.skip_existing, reporter)
    if reporter.mode == "tqdm":
        kept = f", {summary['kept']} kept from an earlier run" if summary["kept"] else ""
        left_out = summary["left_out"]
        kept += f", {len(left_out)} left out as no 3-D scan ({', '.join(left_out)})" if left_out else ""
        print(f"segmented {summary['segmented']} of {summary['cases']} cases into {summary['folder']}{kept} "
              f"({summary['seconds']:.0f} s); volumes and mean intensities in {summary['statistics']}", file=sys.stderr)


def _cmd_info(args, reporter: Reporter) -> None:
    from .catalog import resolve_model
    from .checkpoint import read_metadata
    from .modelinfo import describe

    path = resolve_model(args.model, reporter)
    meta = read_metadata(path)
    print(json.dumps(meta.to_dict(), indent=2) if args.json else describe(meta, path))


def _cmd_models(args, reporter: Reporter) -> None:
    from .modelinfo import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        flag = "*" if row["default"] else "+" if row["default_pretrained"] else " "
        print(f"{flag} {row['name']:<24} {row['modality']:<6} {row.get('task', ''):<15} {row['status']:<22} "
              f"{row['title']}")
    print("(* default for segment, + default for reconstruct; `hybridmim info NAME` describes one)")


def _cmd_sample(args, reporter: Reporter) -> None:
    from .catalog import resolve_sample

    print(resolve_sample(args.name, reporter))


def _cmd_devices(args, reporter: Reporter) -> None:
    from .inference import available_devices
    from .modelinfo import describe_devices

    devices = available_devices()
    reporter.done(devices)
    if reporter.mode != "json":
        print(describe_devices(devices))


def _cmd_reconstruct(args, reporter: Reporter) -> None:
    from .reconstruct import reconstruct

    outputs = reconstruct(args.inputs, args.output, args.model, args.mask_ratio, args.seed, args.device,
                          args.overwrite, reporter)
    if reporter.mode == "tqdm":
        print(f"wrote {args.output}: mean absolute error on masked voxels {outputs['mae_model']} (model) vs "
              f"{outputs['mae_interpolation']} (interpolation from visible voxels), in the input's units",
              file=sys.stderr)


def _cmd_convert(args, reporter: Reporter) -> None:
    from .convert import convert_official

    outputs = convert_official(args.source, args.output, args.overwrite)
    reporter.done(outputs)
    if reporter.mode == "tqdm":
        net = outputs["network"]
        print(f"wrote {outputs['checkpoint']} (SwinUNETR feature_size {net['feature_size']}, depths {net['depths']}; "
              f"dropped: {', '.join(outputs['dropped']) or 'nothing'})", file=sys.stderr)


def _cmd_pretrain(args, reporter: Reporter) -> None:
    from .pretraining.run import run_pretrain

    outputs = run_pretrain(args.data, args.output, reporter, args.method, args.backbone, args.recipe, args.steps,
                           args.resume, args.overwrite, args.cache, args.exclude, args.prepare_only, args.device,
                           args.max_minutes, args.modality)
    if reporter.mode == "tqdm" and not outputs.get("before_training"):
        if "checkpoint" in outputs:
            print(f"wrote {outputs['checkpoint']} (step {outputs['step']} of {outputs['steps']}), "
                  f"curve {outputs['curve']}, resume state {outputs['resume_state']}", file=sys.stderr)
        else:
            print(f"prepared {outputs['volumes']} volumes ({outputs['voxels'] / 1e6:.0f} M voxels)", file=sys.stderr)


def _cmd_finetune(args, reporter: Reporter) -> None:
    from .training.finetune import run_finetune

    outputs = run_finetune(args.init, args.data, args.output, reporter, args.val, args.val_fraction, args.labels,
                           args.epochs, args.recipe, args.resume, args.overwrite, args.cache, args.device,
                           args.prepare_only, args.exclude, args.max_minutes)
    if args.prepare_only:
        if reporter.mode == "tqdm":
            print(f"prepared {outputs['volumes']} cases into {outputs['folder']}", file=sys.stderr)
    elif reporter.mode == "tqdm" and not outputs.get("before_training"):
        best = "" if outputs["best_dice"] is None else f", best validation Dice {outputs['best_dice']:.3f} " \
                                                      f"at epoch {outputs['best_epoch']}"
        curve = f"; curve {outputs['curve']}" if outputs["curve"] else ""
        written = f"wrote {outputs['checkpoint']}{best}" if outputs["checkpoint"] else "no model written yet"
        print(f"{written}{curve}; resume state {outputs['resume_state']}", file=sys.stderr)


def _cmd_evaluate(args, reporter: Reporter) -> None:
    from .evaluate import evaluate

    report = evaluate(args.model, args.data, args.output, args.overlays, args.device, args.overwrite, reporter,
                      args.reference_values)
    if reporter.mode != "json":
        print(f"{len(report['cases'])} cases, {report['seconds']} s", file=sys.stderr)
        for name, s in report["summary"].items():
            dice = "-" if s["dice_mean"] is None else f"{s['dice_mean']:.3f}"
            hd95 = "-" if s["hd95_mm_mean"] is None else f"{s['hd95_mm_mean']:.1f} mm"
            undefined = f" ({s['hd95_undefined']} undefined)" if s["hd95_undefined"] else ""
            print(f"  {name:<40} Dice {dice:>6}  HD95 {hd95:>9}{undefined}  over {s['cases']} cases")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hybridmim",
                     description="Masked-image-modelling pre-trained 3D segmentation (HybridMIMSegment engine).")
    parser.add_argument("--version", action="version", version=f"hybridmim {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    seg = commands.add_parser("segment", help="segment a CT/MR volume (or many, with --data) with a model")
    seg.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="image file (NIfTI, NRRD, MHA) or DICOM series folder; one per model input channel, in the "
                          "model's order")
    seg.add_argument("-o", "--output", required=True,
                     help="label map to write: .seg.nrrd (named segments for Slicer), .nii.gz, .nrrd or .mha; with "
                          "--data, the folder for one label map per case and statistics.csv")
    seg.add_argument("--model", help="catalog model name or checkpoint path (default: the catalog's default model)")
    _add_device(seg)
    seg.add_argument("--preview", metavar="PNG",
                     help="also write a QA preview: slices through each segment and a 3-D rendering")
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    many = seg.add_argument_group("many scans, one model load")
    many.add_argument("--data", nargs="+", metavar="PATH",
                      help="image files, case folders (image.nii.gz or image_0000…, or BraTS' CASE_flair…), DICOM "
                           "series folders (at any depth), folders of them or Decathlon or nnU-Net folders, instead "
                           "of INPUT; labels are ignored")
    many.add_argument("--format", help="label-map type of each case: seg.nrrd (default), nii.gz, nrrd or mha")
    many.add_argument("--previews", action="store_true", help="also draw each case's preview (CASE.png)")
    many.add_argument("--skip-existing", action="store_true",
                      help="keep the cases whose label map is already in the folder (continues an interrupted run)")
    _add_progress(seg)
    seg.set_defaults(handler=_cmd_segment)

    rec = commands.add_parser("reconstruct",
                              help="mask a scan patch-wise and reconstruct it with a pre-trained model (visual QA)")
    rec.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image file or DICOM folder, one per model input channel")
    rec.add_argument("-o", "--output", required=True, metavar="DIR",
                     help="folder for mask, masked, reconstruction and error (.nii.gz) and montage.png")
    rec.add_argument("--model",
                     help="pre-trained checkpoint path or catalog name (default: the catalog's pre-trained model)")
    rec.add_argument("--mask-ratio", type=float,
                     help="share of patches masked (default: the model's pre-training ratio)")
    rec.add_argument("--seed", type=int, default=0, help="which patches are masked (same seed, same mask)")
    _add_device(rec)
    rec.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_progress(rec)
    rec.set_defaults(handler=_cmd_reconstruct)

    pre = commands.add_parser("pretrain", help="self-supervised pre-training on unlabelled scans "
                                               "(HybridMIM, MiM or SelfMedHPM)")
    pre.add_argument("--data", nargs="+", required=True, metavar="PATH",
                     help="image files, case folders (image.nii.gz or image_0000…, or BraTS' CASE_flair…), DICOM "
                          "series folders (at any depth), folders of them, Decathlon or nnU-Net folders, or one "
                          "folder prepared by --prepare-only")
    pre.add_argument("-o", "--output", help="checkpoint to write (.safetensors); the resume state goes beside it")
    pre.add_argument("--method", choices=["hybridmim", "mim", "hpm"],
                     help="pre-training method (default: the recipe's, else hybridmim)")
    pre.add_argument("--backbone", choices=["cnn", "swin", "hybrid"],
                     help="U-Net, SwinUNETR or the convolution + transformer hybrid (default: the recipe's, else "
                          "cnn for hybridmim and hybrid for mim and hpm, the only one they take)")
    pre.add_argument("--modality", choices=["CT", "MR"],
                     help="the scans' modality: CT (the default: HU window, body crop, 1.5 x 1.5 x 2 mm) or MR "
                          "(z-score per scan, 1.5 mm; Resources/Recipes/modality-mr.json)")
    pre.add_argument("--recipe", metavar="FILE", help="JSON recipe merged over the method's defaults "
                                                      "(Resources/Recipes/; examples in scripts/recipes/)")
    pre.add_argument("--steps", type=int, help="total optimiser steps (overrides the recipe)")
    pre.add_argument("--max-minutes", type=float, metavar="M",
                     help="time limit for training, resumed sessions included: the first steps are timed and the "
                          "run keeps the steps that fit (warm-up and schedules shortened alike)")
    _add_training_run_options(pre, "prepare the data into --cache and stop; that folder can then be given as --data")
    pre.set_defaults(handler=_cmd_pretrain)

    fin = commands.add_parser("finetune",
                              help="train a segmentation model from a pre-trained checkpoint or from scratch")
    fin.add_argument("--init", required=True, metavar="CKPT|NAME|scratch",
                     help="checkpoint (path or catalog name) whose encoder and decoder start the model, or 'scratch'")
    fin.add_argument("--data", nargs="+", required=True, metavar="PATH",
                     help="labelled cases: case folders (image.nii.gz + label.nii.gz or label.seg.nrrd; BraTS' "
                          "CASE_flair… + CASE_seg…), folders of them, Decathlon or nnU-Net folders, or one folder "
                          "prepared earlier")
    fin.add_argument("-o", "--output", help="the best model (.safetensors); resume state and curve beside it")
    fin.add_argument("--val", nargs="+", metavar="PATH", help="validation cases (default: --val-fraction of --data)")
    fin.add_argument("--val-fraction", type=float, help="share of --data held out for validation (recipe default 0.2)")
    fin.add_argument("--labels", metavar="FILE", help="JSON list of the labels: value, name, colour, terminology "
                                                      "(default: the recipe's, else those the data's "
                                                      "dataset.json names, else the init model's, else the segment "
                                                      "names of the cases' label.seg.nrrd files)")
    fin.add_argument("--epochs", type=int, help="maximum epochs (overrides the recipe)")
    fin.add_argument("--max-minutes", type=float, metavar="M",
                     help="time limit for training: the run keeps the epochs that fit at the first epoch's pace, "
                          "or that epoch's steps that fit where not even it does")
    fin.add_argument("--recipe", metavar="FILE", help="JSON recipe merged over Resources/Recipes/finetune.json")
    _add_training_run_options(fin, "prepare --data into --cache for this init model and labels, and stop; that "
                                   "folder can then be given as --data or --val")
    fin.set_defaults(handler=_cmd_finetune)

    ev = commands.add_parser("evaluate", help="Dice and HD95 of a model on labelled cases, per case and label")
    ev.add_argument("--model", help="catalog model name or checkpoint path (default: the catalog's default model)")
    ev.add_argument("--data", nargs="+", required=True, metavar="PATH",
                    help="labelled cases: case folders (image.nii.gz + label.nii.gz or label.seg.nrrd; BraTS' "
                         "CASE_flair… + CASE_seg…), folders of them, Decathlon or nnU-Net folders")
    ev.add_argument("-o", "--output", metavar="REPORT", help="JSON report to write; the CSV goes beside it")
    ev.add_argument("--overlays", metavar="DIR", help="also write one PNG per case: reference vs model outlines")
    ev.add_argument("--reference-values", metavar="FILE",
                    help="JSON {\"value\": \"label name\", …}: which of the model's labels each value of the "
                         "reference label maps stands for, the others background (default: the model's values; "
                         "where a dataset.json names values by the model's label names, those)")
    _add_device(ev)
    ev.add_argument("--overwrite", action="store_true", help="replace existing report and overlay files")
    _add_progress(ev)
    ev.set_defaults(handler=_cmd_evaluate)

    conv = commands.add_parser("convert", help="import an official HybridMIM SwinUNETR pre-training checkpoint (.pt)")
    conv.add_argument("source", metavar="PT", help="official checkpoint (.pt/.pth); loaded with weights_only=True")
    conv.add_argument("-o", "--output", required=True, help="checkpoint to write (.safetensors)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_progress(conv)
    conv.set_defaults(handler=_cmd_convert)

    info = commands.add_parser("info", help="describe a checkpoint (file or catalog name)")
    info.add_argument("model", metavar="FILE|NAME")
    info.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    _add_progress(info)
    info.set_defaults(handler=_cmd_info)

    models = commands.add_parser("models", help="list the catalog's models")
    models.add_argument("--json", action="store_true", help="print the catalog's entries as JSON")
    _add_progress(models)
    models.set_defaults(handler=_cmd_models)

    devices = commands.add_parser("devices", help="the GPUs torch can use here (none: the CPU is used)")
    _add_progress(devices)
    devices.set_defaults(handler=_cmd_devices)

    sample = commands.add_parser("sample", help="print the path of a sample volume, downloading and verifying it once")
    sample.add_argument("name", help="sample name from the catalog, e.g. abdomen-ct")
    _add_progress(sample)
    sample.set_defaults(handler=_cmd_sample)
    return parser


def _out_of_memory(exc: Exception) -> str | None:
    """One line for running out of host or GPU memory where no estimate or fallback caught it; None otherwise.
    torch says so with its own error on a GPU and a RuntimeError on the CPU, numpy with a MemoryError."""
    torch = sys.modules.get("torch")  # a GPU's error comes from torch, so it is imported then
    on_gpu = torch is not None and isinstance(exc, torch.OutOfMemoryError)
    if not (on_gpu or isinstance(exc, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc)):
        return None
    asked, amount = re.search(r"(?:[Tt]ried to|Unable to) allocate ([0-9.]+) ([KMGTP]i?B|bytes)", str(exc)), ""
    if asked:
        size = f"{int(asked[1]) / 2**30:.1f} GiB" if asked[2] == "bytes" else f"{asked[1]} {asked[2]}"
        amount = f" (it asked for {size} more)"
    if on_gpu:
        return (f"out of GPU memory{amount}: run it on the CPU (--device cpu), or on smaller inputs or fewer crops at "
                "a time (a recipe's train settings)")
    return f"out of memory{amount}: close other programs, or give smaller inputs"


def _fail(reporter: Reporter, text: str, code: int) -> NoReturn:
    reporter.error(text)
    print(f"error: {text}", file=sys.stderr)
    raise SystemExit(code) from None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    reporter = Reporter("tqdm")
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            raise SystemExit(2)
        reporter = Reporter(args.progress)
        output = getattr(args, "output", None)
        writer = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 writes (and locks)
        with output_lock(output) if output and writer else nullcontext():
            args.handler(args, reporter)
    except UserError as exc:
        _fail(reporter, str(exc), 2)
    except KeyboardInterrupt:
        _fail(reporter, "interrupted", 130)
    except Exception as exc:
        explained = _out_of_memory(exc)
        if explained is None:  # a bug: keep the traceback for the report
            reporter.error(f"internal error: {exc}")
            traceback.print_exc()
            raise SystemExit(1) from None
        _fail(reporter, explained, 1)  # the machine's limit, not a bug: no traceback
