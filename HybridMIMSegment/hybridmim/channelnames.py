"""Input channels as datasets name them, matched to a model's channel names: the Decathlon's "t1gd", BraTS' "t1ce"
and BraTS 2023's "t1c" are one sequence, a model's "T1c"; "t2f" and "T2-FLAIR" are its "FLAIR"."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

# Spellings (lower case, letters and digits only) of one MR sequence, to the one a model's channel is named by
SEQUENCE_SPELLINGS = {"t1gd": "t1c", "t1ce": "t1c", "t1gad": "t1c", "t1post": "t1c", "t1contrast": "t1c",
                      "t1w": "t1", "t1n": "t1", "t2w": "t2", "t2flair": "flair", "t2f": "flair"}
# The channel names a file name may end in (after a case's name: BraTS' CASE_flair.nii.gz), spelled as a model's
FILE_CHANNEL_NAMES = {"flair", "t1", "t1c", "t2", "adc", "dwi", "pd", "swi", "ct", "pet"}
# The ends of a file name that mark a case's label map beside its channels (BraTS' CASE_seg.nii.gz)
LABEL_FILE_ENDS = ("seg", "label")
SEPARATORS = "_-."


def spelled_as_model(name) -> str:
    """A channel name as a model's is spelled: lower case, letters and digits, one name per MR sequence."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return SEQUENCE_SPELLINGS.get(key, key)


def is_file_channel_name(name: str) -> bool:
    """Whether the end of a file's name (BraTS' "flair", "t1ce", "t2f") names an input channel."""
    return spelled_as_model(name) in FILE_CHANNEL_NAMES


def named_ends(stems: list[str], prefix: str) -> list[str] | None:
    """What follows ``prefix`` and a separator (_ - .) in each of ``stems`` (file names without their suffix:
    BraTS' CASE_flair gives flair); None where one does not start so."""
    start = len(prefix) + 1
    if not all(len(stem) > start and stem.startswith(prefix) and stem[len(prefix)] in SEPARATORS for stem in stems):
        return None
    return [stem[start:] for stem in stems]


def shared_name(stems: list[str]) -> str:
    """The case name several files' names share (BraTS2021_00003 of BraTS2021_00003_flair and _t1ce), to their
    last separator; "" where they share none."""
    shared = os.path.commonprefix(stems)
    cut = max(shared.rfind(separator) for separator in SEPARATORS)
    return shared[:cut] if cut > 0 else ""


def fitted_to_model(cases: list, channels, warn: Callable[[str], None]) -> list:
    """``cases`` (volumes.Case) with the channels a model takes (``channels``: its {name, modality}), in the
    model's order, where the data name them: the volumes of a Decathlon image, an nnU-Net or BraTS case's files,
    chosen by name. Where the data's names are not all the model's, their channels are kept in their order (their
    count is checked later), with a warning where they are several: the model reads them by position."""
    wanted = [spelled_as_model(channel["name"]) for channel in channels]
    fitted, said = [], set()
    for case in cases:
        named = [spelled_as_model(name) for name in case.channel_names]
        if named and all(named.count(name) == 1 for name in wanted):
            order = [named.index(name) for name in wanted]
            case = dataclasses.replace(case, channels=tuple(case.channels[i] for i in order),
                                       volumes=tuple(case.volumes[i] for i in order) if case.volumes else (),
                                       channel_names=tuple(case.channel_names[i] for i in order))
        elif len(named) == len(wanted) > 1 and case.channel_names not in said:
            said.add(case.channel_names)
            pairs = ", ".join(f"{given} as {channel['name']}" for given, channel in zip(case.channel_names, channels))
            warn(f"{case.name} (and the cases like it): its data name its channels otherwise than the model; they "
                 f"are read in order: {pairs}")
        fitted.append(case)
    return fitted
