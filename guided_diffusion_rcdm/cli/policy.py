"""The commands' error policy, in one place.

- A user's mistake (`errors.UserError`, raised where the mistake is detected: a bad flag value or
  combination, a missing or empty folder, a checkpoint that does not fit the flags, a failed
  download, an output folder that is locked or cannot be written, a full disk): one line
  `PROG: error: MESSAGE` on stderr, exit status 2. The commands check their inputs before they
  create or write anything, so such a mistake leaves the output folder as it was.
- A bad flag or flag value found by the parser: one line naming the flag, exit status 2.
- Ctrl-C: exit status 130, no traceback (training saves a checkpoint first).
- Anything else is a bug: its traceback is kept (exit status 1).
`RCDM_DEBUG=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import UsageError, UserError
from ..fileio import check_out_dir as _check_out_dir
from .flags import parse_args

DEBUG_ENV = "RCDM_DEBUG"  # set to 1 to get full tracebacks instead of one-line errors
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130


def report_user_error(prog: str, err: BaseException) -> int:
    """Write `PROG: error: MESSAGE` (one line) to stderr; return the exit status."""
    message = " ".join(str(err).split("\n")) or type(err).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def run_main(main: Callable[[], Any], prog: str) -> int:
    """Run `main()` under the error policy; return the exit status (0 on success)."""
    try:
        main()
    except UserError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        return report_user_error(prog, err)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    return 0


def run_command(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
                argv: Iterable[str] | None = None) -> int:
    """Parse `argv` (default: the command line) with `parser`, then run `main(args)` under the
    error policy; return the exit status. A parser mistake exits at once with status 2."""
    args = parse_args(parser, argv)
    return run_main(lambda: main(args), parser.prog)


def check_out_dir(folder: str, flag: str = "--out_dir") -> None:
    """Fail, naming the flag, when `folder` could not be created or written; creates nothing."""
    _check_out_dir(folder, flag)
