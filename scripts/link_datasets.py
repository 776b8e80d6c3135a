#!/usr/bin/env python3
"""Lay out ../shared/data's labelled collections as dataset folders (DESIGN.md: case folders with
image.nii.gz or image_0000/0001.nii.gz, and label.nii.gz), as symbolic links, with the splits the
shipped models use:

  sarcoma/train  STS_001-035       sarcoma/val  STS_036-045
  abdomen/train  ct_a              abdomen/val  ct_b            (BTCV-13 labels: TotalSegmentator output)
  brain/train    pat0005, pat0006  brain/val    pat0003, pat0004 (image_0000 FLAIR, image_0001 T1c)

  scripts/link_datasets.py [--data ../shared/data] [-o .devdata/datasets]
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _link(case: Path, files: dict[str, Path]) -> None:
    case.mkdir(parents=True, exist_ok=True)
    for name, target in files.items():
        if not target.is_file():
            raise SystemExit(f"error: {target} is missing")
        link = case / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())


def layout(data: Path) -> dict[str, dict[str, dict[str, Path]]]:
    """{split folder: {case name: {file name in the case folder: source file}}}."""
    sarcoma = {f"STS_{n:03d}": {"image.nii.gz": data / f"sarcoma_ct/STS_{n:03d}/image.nii.gz",
                                "label.nii.gz": data / f"sarcoma_ct/STS_{n:03d}/label.nii.gz"} for n in range(1, 46)}
    abdomen = {name: {"image.nii.gz": data / f"abdomen_ct/{name}.nii.gz",
                      "label.nii.gz": data / f"abdomen_ct/{name}_btcv13.nii.gz"} for name in ("ct_a", "ct_b")}
    brats = {n: data / f"brain_tumor_mr/brats_2013_pat{n:04d}_1" for n in (3, 4, 5, 6)}
    brain = {f"pat{n:04d}": {"image_0000.nii.gz": case / "Flair_subtrMeanDivStd.nii.gz",
                             "image_0001.nii.gz": case / "T1c_subtrMeanDivStd.nii.gz",
                             "label.nii.gz": case / "OTMultiClass.nii.gz"}
             for n, case in brats.items()}
    return {
        "sarcoma/train": {k: v for k, v in sarcoma.items() if int(k[4:]) <= 35},
        "sarcoma/val": {k: v for k, v in sarcoma.items() if int(k[4:]) > 35},
        "abdomen/train": {"ct_a": abdomen["ct_a"]},
        "abdomen/val": {"ct_b": abdomen["ct_b"]},
        "brain/train": {k: brain[k] for k in ("pat0005", "pat0006")},
        "brain/val": {k: brain[k] for k in ("pat0003", "pat0004")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("-o", "--output", type=Path, default=REPO / ".devdata" / "datasets")
    args = parser.parse_args()
    for split, cases in layout(args.data).items():
        for name, files in cases.items():
            _link(args.output / split / name, files)
        print(f"{args.output / split}: {len(cases)} cases")


if __name__ == "__main__":
    main()
