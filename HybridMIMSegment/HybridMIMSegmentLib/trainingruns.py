"""The panel's training runs kept on disk, so that Resume outlives the Slicer session: each run leaves a
record beside the model it writes (``NAME.run.json``: what kind of run, the engine arguments that resume
it, the folder of scene exports it reads), kept while the run can be resumed and removed, with those
exports, once it has written its model or is replaced by a new run of its kind."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hybridmim.atomic import atomic_output
from hybridmim.runfiles import RECORD_SUFFIX, record_path, state_path

KINDS = ("finetune", "pretrain")
# A run still without a state this long after it started is not preparing its data any more (its Slicer ended
# first): its record goes. A younger one may be another Slicer's run, reading its exports now.
_ABANDONED_SECONDS = 24 * 3600


@dataclass(frozen=True)
class TrainingRun:
    """``kind``: "finetune" or "pretrain"; ``output``: the checkpoint it writes; ``resume``: the engine
    arguments that continue it; ``exports``: the folder the panel wrote the scene's data to for it (or None)."""

    kind: str
    output: str
    resume: tuple[str, ...]
    exports: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def record(self) -> Path:
        return record_path(Path(self.output))

    @property
    def name(self) -> str:
        return Path(self.output).name.removesuffix(".safetensors")

    def save(self) -> None:
        with atomic_output(self.record) as tmp:
            tmp.write_text(json.dumps({**asdict(self), "resume": list(self.resume)}, indent=1), encoding="utf-8")

    def resumable(self) -> bool:
        """Whether the run has saved a state to continue from, and the scene data it exported are still there."""
        return state_path(Path(self.output)).is_file() and (self.exports is None or Path(self.exports).is_dir())

    def reminder(self) -> str:
        """What the panel says of a run stopped in an earlier session."""
        saved = time.strftime("%d %b %H:%M", time.localtime(state_path(Path(self.output)).stat().st_mtime))
        return f"{self.name} was stopped (state saved {saved}): Resume continues it."

    def forget(self) -> None:
        """Remove the record and the exports (the model and its resume state stay for the terminal's --resume)."""
        self.record.unlink(missing_ok=True)
        if self.exports:
            shutil.rmtree(self.exports, ignore_errors=True)


def _read(record: Path) -> TrainingRun | None:
    try:
        fields = json.loads(record.read_text(encoding="utf-8"))
        run = TrainingRun(fields["kind"], fields["output"], tuple(fields["resume"]), fields.get("exports"))
    except (OSError, ValueError, KeyError, TypeError):  # damaged or from another version: not offered
        return None
    return run if run.record == record else None  # a record copied from elsewhere names another model


def last_stopped_run(folder: str | Path, kind: str) -> TrainingRun | None:
    """The newest run of ``kind`` recorded in ``folder`` that can be resumed (the records of runs that never saved
    a state, or whose state was deleted, go once a day old)."""
    runs = []
    for record in Path(folder).glob("*" + RECORD_SUFFIX):
        run = _read(record)
        if run is None or run.kind != kind:
            continue
        if not run.resumable():
            if time.time() - record.stat().st_mtime > _ABANDONED_SECONDS:
                run.forget()
            continue
        runs.append((state_path(Path(run.output)).stat().st_mtime, run))
    return max(runs, key=lambda pair: pair[0])[1] if runs else None


def keep_for_resume(run: TrainingRun, succeeded: bool, outputs: dict | None) -> bool:
    """After ``run`` ended: whether it stays for Resume (stopped, or failed after saving a state); a run that
    wrote its model, or that has nothing to continue from, is forgotten."""
    finished = succeeded and not (outputs or {}).get("stopped")
    if finished or not run.resumable():
        run.forget()
        return False
    return True


def models_folder(user_folder: str | Path) -> Path:
    """Where the panel's training runs write their models (and records)."""
    return Path(user_folder) / "models"


def new_run_paths(user_folder: str | Path, prefix: str) -> tuple[str, str]:
    """(model, exports folder) of a new run: ``models/PREFIX-DATE-TIME.safetensors`` and a folder of the same
    name under ``training-data`` for the scene data it reads (kept while the run can be resumed)."""
    name = time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    return str(models_folder(user_folder) / f"{name}.safetensors"), str(Path(user_folder) / "training-data" / name)
