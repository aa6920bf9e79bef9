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

The core's messages name an argument by its keyword in backticks (`` `steps` must be between 1 and 1000 ``),
the way a library user passed it; `flag_message` turns each into the command's flag (`--steps`),
here and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ..encoders.spec import FLAGS as ENCODER_FLAGS
from ..errors import UserError
from .flags import parse_args

DEBUG_ENV = "RCDM_DEBUG"  # set to 1 to get full tracebacks instead of one-line errors
USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130


# Core keyword -> command-line flag, for the keywords the commands spell differently; any other
# keyword reads as `--KEYWORD`. Either way only where the command has that flag, else bare.
KEYWORD_FLAGS = {
    # The encoder's fields (`EncoderSpec`, `get_model`): `pooling` is --encoder_pooling, ...
    **{field: f"--{flag}" for field, flag in ENCODER_FLAGS.items() if field != flag},
    "path": "--inception_path",       # metrics.load_inception / inception_weights_path
    "cache_dir": "--feat_cache",      # feature_cache.prepare_feature_cache
    "dtype": "--feat_cache_dtype",    # feature_cache.prepare_feature_cache
    "neighbor_feats": "--folder_nn_path",  # RCDM.manipulate
}
_KEYWORD = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def flag_message(message: str, parser: argparse.ArgumentParser | None = None) -> str:
    """`message` in the command's words: each backticked keyword (`` `steps` ``, as the core names
    its arguments) becomes the command's flag (`--steps`; `KEYWORD_FLAGS` for the renamed ones) when
    `parser` has that option, else the bare keyword."""
    options = {o for action in parser._actions for o in action.option_strings} if parser else set()

    def flag(match: re.Match) -> str:
        name = match.group(1)
        wanted = KEYWORD_FLAGS.get(name, f"--{name}")
        return wanted if wanted in options else name

    return _KEYWORD.sub(flag, message)


def report_user_error(prog: str, err: BaseException, parser: argparse.ArgumentParser | None = None) -> int:
    """Write `PROG: error: MESSAGE` (one line, in `parser`'s flags: `flag_message`) to stderr;
    return the exit status."""
    message = flag_message(" ".join(str(err).split("\n")), parser) or type(err).__name__
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS


def run_main(main: Callable[[], Any], prog: str, parser: argparse.ArgumentParser | None = None) -> int:
    """Run `main()` under the error policy; return the exit status (0 on success). A user error's
    message names `parser`'s flags (`flag_message`)."""
    try:
        main()
    except UserError as err:
        if os.environ.get(DEBUG_ENV):
            raise
        return report_user_error(prog, err, parser)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    return 0


def run_command(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
                argv: Iterable[str] | None = None) -> int:
    """Parse `argv` (default: the command line) with `parser`, then run `main(args)` under the
    error policy; return the exit status. A parser mistake exits at once with status 2."""
    args = parse_args(parser, argv)
    return run_main(lambda: main(args), parser.prog, parser)
