"""The published RCDM checkpoints, and reading `--model_path` files.

Nine 128x128 models were released, one per encoder and representation (trunk or head); they are
plain state dicts that record neither their flags nor their encoder, so `published_meta` supplies
both (the README's `$MODEL_FLAGS_128` and the representation size). Downloads go through
`hub.download` (torch.hub cache, `RCDM_MIRROR`, checksums, weights_only). The weights are under
CC-BY-NC (https://dl.fbaipublicfiles.com/rcdm/LICENSE), unlike this code.
"""

from __future__ import annotations

import warnings

import torch

from .config import published_128
from .errors import UsageError
from . import hub
from .encoders import EncoderSpec
from .get_ssl_models import ENCODER_NAMES, HEAD_DIMS

RCDM_BASE_URL = "https://dl.fbaipublicfiles.com/rcdm/"

# The flags every published checkpoint was trained with (the README's $MODEL_FLAGS_128).
MODEL_FLAGS_128 = published_128().flags()


def _check_name(model: str) -> str:
    key = model.lower()
    if key not in ENCODER_NAMES:
        raise UsageError(
            f"no published RCDM checkpoint for `type_model` {model!r}: there is one for each of "
            f"{', '.join(ENCODER_NAMES)} (trunk, or head with `use_head`; supervised has no head). "
            "For another encoder, train a model and pass it with `model_path`."
        )
    return key


def _use_head(model: str, use_head: bool) -> bool:
    if model == "supervised" and use_head:
        warnings.warn("the supervised RCDM has no head variant: use_head is ignored "
                      "(as in the original)", stacklevel=3)
        return False
    return use_head


def rcdm_checkpoint_url(model: str = "dino", use_head: bool = False) -> str:
    """URL of the published checkpoint for an encoder and representation."""
    model = _check_name(model)
    if model == "supervised":
        return RCDM_BASE_URL + "rcdm_ema_supervised.pt"
    return RCDM_BASE_URL + f"rcdm_ema_{model}_{'head' if use_head else 'trunk'}.pt"


def published_ssl_dim(model: str, use_head: bool = False) -> int:
    model = _check_name(model)
    return HEAD_DIMS[model] if use_head and model != "supervised" else 2048


def published_meta(model: str = "dino", use_head: bool = False) -> dict:
    """What a published checkpoint would record if it recorded anything: flags and encoder."""
    model = _check_name(model)
    use_head = use_head and model != "supervised"
    ssl_dim = published_ssl_dim(model, use_head)
    # Trained on [-1, 1] inputs, the supervised ResNet-50's included: the original fed them that.
    encoder = EncoderSpec(model, use_head, input_normalize="minus_one_one", input_size=224, width=ssl_dim)
    return {
        "model_flags": published_128(ssl_dim=ssl_dim).to_record(),
        "encoder": encoder.to_dict(),
    }


def get_dict_rcdm_model(model: str = "dino", use_head: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a published RCDM checkpoint, downloaded (or cached) safely."""
    key = _check_name(model)
    url = rcdm_checkpoint_url(key, _use_head(key, use_head))
    path = hub.download(url, verify=published_check(key, _use_head(key, use_head)))
    state_dict, _ = hub.load_checkpoint(path)
    return state_dict


def published_check(model: str = "dino", use_head: bool = False):
    """The `hub.download` check of a published RCDM file: the RCDM layout, then exactly the keys
    and shapes of the UNet `published_meta` describes (built on the meta device), so that no other
    architecture enters the cache under the published name."""
    from .script_util import create_model_and_diffusion

    flags = published_meta(model, use_head)["model_flags"]
    shapes = hub.fits(lambda: create_model_and_diffusion(**flags)[0],
                      f"the published 128x128 RCDM ({model}, ssl_dim {flags['ssl_dim']})")

    def verify(path) -> None:
        check_rcdm_layout(path)
        shapes(path)
    return verify


# Keys every published RCDM checkpoint holds (the 128x128 UNet with its representation input).
_RCDM_KEYS = ("input_blocks.0.0.weight", "ssl_emb.weight", "out.2.weight", "time_embed.0.weight")


def check_rcdm_layout(path) -> None:
    """Raise CheckpointError unless `path` holds an RCDM UNet state dict (before it is cached)."""
    state_dict, _ = hub.load_checkpoint(path)
    missing = [k for k in _RCDM_KEYS if k not in state_dict]
    if missing:
        raise hub.CheckpointError(f"not an RCDM checkpoint: no {', '.join(missing)}")


def load_rcdm_checkpoint(model_path: str = "", type_model: str = "dino",
                         use_head: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """`(state_dict, meta)` for `--model_path`, or for the published model when it is empty.

    `--model_path` may be a published-style plain state dict, one of the project's own
    checkpoints (which carry `meta`: flags, encoder, step) or a `.safetensors` file.
    """
    if model_path:
        return hub.load_checkpoint(model_path)
    key = _check_name(type_model)
    use_head = _use_head(key, use_head)
    return get_dict_rcdm_model(key, use_head), published_meta(key, use_head)
