"""Files that torch.save writes (official checkpoints, resume states): read safely, tensors and plain
containers only (``weights_only``), any failure one line; written so that a full disk is an OSError."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

from .errors import UserError, message_line

# torch.save writes a zip archive; its legacy format is a pickle, which starts with the protocol opcode
_TORCH_HEADS = (b"PK\x03\x04", b"\x80")
# how torch's weights-only unpickler names an object it will not build ("Unsupported global: GLOBAL x.y", "unsupported
# GLOBAL os.system whose module …"); every unpickling error of it, a damaged file's too, starts the same
_UNSAFE = "GLOBAL "


def save_torch_file(obj, path: Path) -> None:
    """``torch.save`` through a Python file: a full disk is then OSError ENOSPC (``atomic_output`` says so in one
    line), where torch's own file writer raises a bare RuntimeError ("unexpected pos 768 vs 662")."""
    import torch

    with open(path, "wb") as handle:
        torch.save(obj, handle)


def load_torch_file(path: Path, what: str):
    """``torch.load(path, weights_only=True)`` onto the CPU; a file that is not ``what`` (another format, damaged,
    or holding objects that loading would run code for) is a one-line UserError."""
    import torch

    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_HEADS):
        raise UserError(f"{path}: not a readable {what} (not a file that torch.save writes)")
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol: the outcome is said below
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = next((line.strip() for line in str(exc).splitlines() if _UNSAFE in line), None)
        if unsafe:
            raise UserError(f"{path}: refused: it holds more than tensors and would run code if loaded "
                            f"({unsafe[:160]})") from None
        raise UserError(f"{path}: not a readable {what} (a damaged pickle)") from None
    except Exception as exc:  # noqa: BLE001 - truncated or damaged: torch raises many types
        # the first sentence: torch goes on to advise a reader of its own code ("If you are seeing this error, …")
        raise UserError(f"{path}: not a readable {what} ({message_line(exc).split('. ')[0][:160]})") from None
