"""The ``diep-hub`` command line: thin commands over the library.

Data goes to stdout (JSON with ``--json``), logs and progress bars to stderr. Every failure ends in exactly one
stderr line ``diep-hub <command>: error: <message>`` and exit code 2, decided in :func:`main` only: errors raised on
purpose by the library (:class:`~diep_hub.errors.DiEPError`) and operating-system errors (a missing file, a full
disk) give their message, the library's Python advice put in the command's words (:mod:`.advice`: the flag, not
the keyword); anything else is a bug, said as such. ``-v`` adds the traceback. A reproduction that ran
and does not match exits with 1; Ctrl-C exits with 130. Log records are prefixed ``LEVEL name:`` on every line,
so they are never mistaken for the error line. ``-q`` / ``-v`` also set transformers' and huggingface_hub's
verbosity.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from ..errors import DiEPError
from .advice import cli_message
from .output import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_MISMATCH, EXIT_OK
from .parser import build_parser

logger = logging.getLogger("diep_hub.cli")

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_MISMATCH", "EXIT_OK", "build_parser", "main", "one_line"]


class _EveryLineFormatter(logging.Formatter):
    """``LEVEL name: message`` on every line of a record (multi-line messages, tracebacks): a log line can never
    pass for the command's one error line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"{record.levelname} {record.name}: "
        lines = text.splitlines() or [""]
        return "\n".join([lines[0]] + [prefix + line for line in lines[1:]])


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EveryLineFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("diep_hub")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _library_verbosity(verbose: int, quiet: bool) -> None:
    """``-q`` / ``-v`` / ``-vv`` for transformers and huggingface_hub too (error / info / debug; their own default,
    warning, without a flag). Imported here, after parsing, and only for a flag: ``--help`` stays cheap."""
    if not verbose and not quiet:
        return
    level = "error" if quiet else ("debug" if verbose > 1 else "info")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    for library in (hub_logging, transformers_logging):
        getattr(library, f"set_verbosity_{level}")()


def one_line(message: object) -> str:
    """A message on one line: a multi-line one (a recipe's list of problems) joins its lines with "; "."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    rest = [line.removeprefix("- ") for line in lines[1:]]
    return lines[0] + (" " + "; ".join(rest) if rest else "")


def _os_error_message(exc: OSError) -> str:
    """An OSError with the file it concerns ("[Errno 28] No space left on device: 'out/model.safetensors'")."""
    text = str(exc)
    for name in (exc.filename, exc.filename2):
        if name is not None and str(name) not in text:
            text += f": {name}"
    return text


class _LineTrackingStream:
    """``sys.stderr`` while a command runs, remembering whether the last write ended its line.

    A progress bar leaves the cursor after its ``\\r``-drawn text; the final message must start a line of its own
    rather than continue the bar's.
    """

    def __init__(self, stream):
        self._stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _close_progress_bars() -> None:
    """Close the bars of the failed step (a ``for`` over ``tqdm`` stays open while its traceback lives): they
    would otherwise draw themselves again after the error line, when they are garbage-collected."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot draw must not hide the error
            pass


def _final_line(stream: _LineTrackingStream, text: str) -> None:
    _close_progress_bars()
    stream.flush()
    stream.write(("" if stream.at_line_start else "\n") + text + "\n")
    stream.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``diep-hub``: parse, run one command, turn every failure into one stderr line.

    Exit codes: 0 done, 1 a reproduction ran and differs, 2 an error (expected or not), 130 interrupted. With
    ``-v`` the traceback follows the error line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose or 0
    stderr = sys.stderr = _LineTrackingStream(sys.stderr)
    try:
        _setup_logging(verbose, bool(args.quiet))
        _library_verbosity(verbose, bool(args.quiet))
        return _run(args, stderr, verbose)
    finally:
        sys.stderr = stderr._stream


def _run(args: argparse.Namespace, stderr: _LineTrackingStream, verbose: int) -> int:
    def fail(message: str) -> int:
        _final_line(stderr, f"diep-hub {args.command}: error: {one_line(message)}")
        if verbose:
            traceback.print_exc(file=stderr)
        return EXIT_ERROR

    try:
        return args.func(args)
    except KeyboardInterrupt:
        _final_line(stderr, f"diep-hub {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except DiEPError as exc:
        return fail(cli_message(str(exc), args))
    except OSError as exc:  # missing files, unreachable or unknown Hub repos (transformers raises OSError), full disks
        return fail(_os_error_message(exc))
    except Exception as exc:  # a bug: still one line, and it says so
        text = one_line(exc)
        text = text if len(text) <= 300 else text[:300] + "..."
        return fail(f"unexpected {type(exc).__name__}: {text}; this is a bug: run with -v for the traceback and "
                    "report it")


if __name__ == "__main__":
    sys.exit(main())
