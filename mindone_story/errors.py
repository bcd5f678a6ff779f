"""What counts as the user's mistake, and how a front end reports it.

Every error the library raises for bad input, a bad file or an unusable output folder is a ``StoryError`` (the
weight readers' ``LayoutError`` too; their ``WeightFileError`` is a ``ValueError``, which front ends treat the same way),
and its message names the problem in one line. Front ends call ``main_guard``: expected errors become
``error: <message>`` and exit status 2, Ctrl-C (or SIGTERM) becomes one line saying what was kept, and anything else
is a bug, shown as a traceback with a request to report it.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
import traceback
from collections.abc import Callable


class StoryError(ValueError):
    """Bad input the user can fix; its message is shown alone."""


class LayoutError(StoryError):
    """A checkpoint that does not fit: another model family or layout, a missing component, or weights that do not
    match the model (the message lists the missing, unexpected and mis-shaped keys)."""


class RecordError(StoryError):
    """A run record (story.json) that cannot be used: unreadable, of another method, or cut short."""


class OutputFolderError(StoryError):
    """An output folder that cannot take this run: a file, read-only, or holding another run."""


_OS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
}


def describe(error: BaseException) -> str:
    """One line for an expected error: its message, or for an OS error the reason and the file."""
    if isinstance(error, OSError) and not isinstance(error, StoryError):
        reason = _OS_REASONS.get(error.errno, error.strerror or str(error))
        where = f": {error.filename}" if error.filename else ""
        return f"{reason}{where}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error.reason} at byte {error.start})"
    return str(error).strip()


def main_guard(
    main: Callable[[], int], on_interrupt: Callable[[], str] | None = None, where: Callable[[], str] | None = None
) -> int:
    """Run a front end's ``main`` and turn what it raises into an exit status (0 ok, 2 bad input, 130 Ctrl-C);
    ``where()`` names the process in the error line (the rank of a parallel run)."""
    previous = _stop_on_sigterm()
    try:
        return main()
    except KeyboardInterrupt:
        kept = on_interrupt() if on_interrupt else ""
        print(f"interrupted{': ' + kept if kept else ''}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # StoryError, the readers' errors, and the file system's
        place = where() if where else ""
        print(f"error: {describe(e)}{f' ({place})' if place else ''}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory: try a smaller height and width, or fewer panels per batch", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print("this is a bug in mindone-story: please report it with the lines above", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """While a graph compiles (and after, until ``modes`` gives Ctrl-C back), MindSpore's C handler takes Ctrl-C: it
    stops the compile and ends the process with SIGTERM. So SIGTERM, from that handler or from ``kill`` or a job
    scheduler, stops a run as Ctrl-C does, keeping what is finished; Python's Ctrl-C handler comes back first, since
    MindSpore's leaves the default one (a second Ctrl-C would kill the process without a word). Returns the handler
    it replaced, or None off the main thread (the only one that may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)
