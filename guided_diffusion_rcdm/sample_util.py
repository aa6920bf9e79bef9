"""The sampling scripts' shared code under its old name.

It lives in the command-line layer now: flags and helpers in `cli.sampling`, the error policy in
`cli.policy`, the declarations of every flag in `cli.flags`. The names below stay importable for
code written against this module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from .cli.flags import explicit_flags, parse_args  # noqa: F401
from .cli.policy import DEBUG_ENV, run_command  # noqa: F401
from .cli.sampling import (  # noqa: F401
    check_counts,
    check_enough_images,
    check_image_file,
    check_model_path,
    check_out_dir,
    complete_args,
    create_argparser,
    describe,
    distances_if_asked,
    list_folder_images,
    load_components,
    load_folder_views,
    load_image_views,
    output_paths,
    require_faiss,
    resolve_device,
    row,
    run_metadata,
    sampler_name,
    save_grid,
    save_npz,
    seed_everything,
    stack,
    to_uint8,
)
from .errors import UsageError, UserError  # noqa: F401 (UsageError: importable here as before)
from .loading import SAMPLING_TIME_FLAGS, Components  # noqa: F401

# The errors reported as one line: the user-error types, raised where a mistake is detected.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


def run_cli(main: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
            argv: Iterable[str] | None = None) -> None:
    """Parse the command line and run `main` under the error policy (`cli.policy`); exits unless it succeeds."""
    status = run_command(main, parser, argv)
    if status:
        raise SystemExit(status)
