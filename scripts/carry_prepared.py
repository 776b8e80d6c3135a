#!/usr/bin/env python3
"""Packs prepared fine-tuning folders into one xz archive for a GPU machine, and unpacks it there.

The prepared .npz files are zip-deflated; their arrays re-compressed with xz travel about 20 % smaller
(60 → 48 MB for the three shipped models' folders), which lets them and the repo fit in one call of the
`device` tool (64 MiB in all). Unpacked, each .npz is written back uncompressed (np.load reads both).

    scripts/carry_prepared.py pack .devdata/prepared .devdata/carry/prepared.tar.xz
    scripts/carry_prepared.py unpack .devdata/carry/prepared.tar.xz .devdata/prepared
"""

from __future__ import annotations

import argparse
import io
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(folder: Path, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz", preset=9) as tar:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            if path.suffix != ".npz":
                _add(tar, name, path.read_bytes())
                continue
            with zipfile.ZipFile(path) as npz:  # each array as its own member: name.npz/array.npy
                for member in npz.namelist():
                    _add(tar, f"{name}/{member}", npz.read(member))


def unpack(archive: Path, folder: Path) -> None:
    arrays = defaultdict(dict)
    with tarfile.open(archive, "r:xz") as tar:
        for info in tar:
            data = tar.extractfile(info).read()
            npz, _, member = info.name.partition(".npz/")
            if member:
                arrays[npz + ".npz"][member] = data
                continue
            (folder / info.name).parent.mkdir(parents=True, exist_ok=True)
            (folder / info.name).write_bytes(data)
    for name, members in arrays.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(folder / name, "w", zipfile.ZIP_STORED) as npz:
            for member, data in members.items():
                npz.writestr(member, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["pack", "unpack"])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    (pack if args.action == "pack" else unpack)(args.source, args.target)


if __name__ == "__main__":
    main()
