"""`rcdm COMMAND [FLAGS]` (also `python -m guided_diffusion_rcdm COMMAND [FLAGS]`): one entry
point for every command, installed by `pip install -e .`.

Each command takes the flags of its script in scripts/ (`rcdm sample --help`): the scripts and
these commands run the same code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from .apps import benchmark, explore, quickstart
from .cli import cache, evaluate, sample, train

# command -> (what it does, runner(argv, prog) -> exit status, the script it stands for)
COMMANDS: dict[str, tuple[str, Callable[[Sequence[str], str], int], str]] = {
    "train": ("train an RCDM on a folder of images", lambda argv, prog: train.main(argv, prog),
              "scripts/image_train.py"),
    "sample": ("sample images from the representations of a folder's images",
               lambda argv, prog: sample.main("sample", argv, prog), "scripts/image_sample.py"),
    "interpolate": ("sample along the interpolation between two images' representations",
                    lambda argv, prog: sample.main("interpolate", argv, prog),
                    "scripts/image_sample_interpolation.py"),
    "manipulate": ("edit a representation with its neighbourhood's shared dimensions",
                   lambda argv, prog: sample.main("manipulate", argv, prog), "scripts/image_sample_manipulation.py"),
    "eval": ("score a sample file: representation fidelity, FID and IS",
             lambda argv, prog: evaluate.main(argv, prog), "scripts/image_eval.py"),
    "cache": ("encode a folder of images once, for training with --feat_cache",
              lambda argv, prog: cache.main(argv, prog), "python -m guided_diffusion_rcdm cache"),
    "quickstart": ("train a small RCDM on photographs offline and write a report",
                   lambda argv, prog: quickstart.main(argv, prog), "scripts/quickstart.py"),
    "benchmark": ("time the UNet, the samplers and training on this machine",
                  lambda argv, prog: benchmark.main(argv, prog), "scripts/benchmark.py"),
    "explore": ("look at a representation interactively, in the browser (a local web app)",
                lambda argv, prog: explore.main(argv, prog), "python -m guided_diffusion_rcdm explore"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" + (f" ({script})" if script.startswith("scripts/") else "")
             for name, (what, _, script) in COMMANDS.items()]
    return ("usage: rcdm COMMAND [FLAGS]   (rcdm COMMAND --help for its flags)\n\n"
            "Representation-conditioned diffusion models (RCDM).\n\ncommands:\n" + "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `rcdm COMMAND FLAGS...`; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"rcdm: error: unknown command {command!r}: choose one of {', '.join(COMMANDS)} (rcdm --help)",
              file=sys.stderr)
        return 2
    return COMMANDS[command][1](rest, f"rcdm {command}")


if __name__ == "__main__":
    sys.exit(main())
