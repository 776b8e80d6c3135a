"""Errors the user can fix: reported as one line on stderr, exit code 2."""


class UserError(Exception):
    """Bad input or usage: the message is shown as ``error: <message>``."""


class DiskFull(UserError):
    """A write found no room left: a run of many cases stops at the first (the next writes would fail alike)."""


class NotAScan(UserError):
    """An image that is no 3-D scan: a single slice, a 2-D, 4-D or colour image, a series of the same slices
    imaged again and again, a DICOM folder with no image series (a PACS export's scout, its screenshot or report of
    the dose, its bolus tracking). A pool of scans leaves it out (pre-training, ``segment --data``); anywhere else
    it is refused."""

    def left_out(self, case: str) -> str:
        """The warning of a pool that leaves this image, its case ``case``, out."""
        return f"{case}: left out, no 3-D scan: {self}"

    @staticmethod
    def none_left(images: int, task: str) -> UserError:
        """The refusal of a pool whose ``images`` were each left out, with nothing left to ``task``."""
        return UserError(f"no 3-D scans to {task}: the {images} images given were each left out (the warnings above "
                         "say why)")


def message_line(exc: Exception, last: bool = False) -> str:
    """The first (``last``: the last) non-empty line of an exception's message, else its type's name (a library's
    error can be empty or span lines; ITK's start with a file:line prefix and end with the useful part)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else type(exc).__name__
