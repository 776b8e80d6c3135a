"""The ``hybridmim`` command line. Exit codes: 0 success, 2 bad input or usage
(one ``error: …`` line on stderr), 1 internal fault (with a traceback)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from . import __version__
from .errors import UserError
from .progress import Reporter


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=["json", "tqdm", "quiet"], default="tqdm",
                        help="json: machine-readable progress lines on stdout (see docs/PROGRESS.md)")


def _cmd_segment(args, reporter: Reporter) -> None:
    from .segment import segment

    outputs = segment(args.inputs, args.output, args.model, args.device, args.preview, args.overwrite, reporter)
    if reporter.mode == "tqdm":
        found = [s for s in outputs["segments"] if s["volume_ml"] > 0]
        print(f"wrote {outputs['segmentation']} ({len(found)} of {len(outputs['segments'])} segments found)"
              + (f" and {outputs['preview']}" if "preview" in outputs else ""), file=sys.stderr)


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
        flag = "*" if row["default"] else " "
        print(f"{flag} {row['name']:<24} {row['modality']:<6} {row['status']:<22} {row['title']}")
    print("(* default; `hybridmim info NAME` describes one)")


def _cmd_sample(args, reporter: Reporter) -> None:
    from .catalog import resolve_sample

    print(resolve_sample(args.name, reporter))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hybridmim", description="Masked-image-modelling pre-trained 3D segmentation (HybridMIMSegment engine).")
    parser.add_argument("--version", action="version", version=f"hybridmim {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    seg = commands.add_parser("segment", help="segment a CT/MR volume with a model")
    seg.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="image file (NIfTI, NRRD, MHA) or DICOM series folder; one per model input channel, in the model's order")
    seg.add_argument("-o", "--output", required=True, help="label map to write: .seg.nrrd (named segments for Slicer), .nii.gz, .nrrd or .mha")
    seg.add_argument("--model", help="catalog model name or checkpoint path (default: the catalog's default model)")
    seg.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    seg.add_argument("--preview", metavar="PNG", help="also write a QA preview: slices through each segment and a 3-D rendering")
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_progress(seg)
    seg.set_defaults(handler=_cmd_segment)

    info = commands.add_parser("info", help="describe a checkpoint (file or catalog name)")
    info.add_argument("model", metavar="FILE|NAME")
    info.add_argument("--json", action="store_true", help="print the full metadata as JSON")
    _add_progress(info)
    info.set_defaults(handler=_cmd_info)

    models = commands.add_parser("models", help="list the catalog's models")
    models.add_argument("--json", action="store_true")
    _add_progress(models)
    models.set_defaults(handler=_cmd_models)

    sample = commands.add_parser("sample", help="print the path of a sample volume, downloading and verifying it once")
    sample.add_argument("name", help="sample name from the catalog, e.g. abdomen-ct")
    _add_progress(sample)
    sample.set_defaults(handler=_cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    reporter = Reporter("tqdm")
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            raise SystemExit(2)
        reporter = Reporter(args.progress)
        args.handler(args, reporter)
    except UserError as exc:
        reporter.error(str(exc))
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        reporter.error("interrupted")
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # a bug: keep the traceback for the report
        reporter.error(f"internal error: {exc}")
        traceback.print_exc()
        raise SystemExit(1) from None
