"""The frozen encoders, described once (`spec.EncoderSpec`), and the adapters that run the field's
libraries' models (`adapters`: timm, Hugging Face transformers, OpenCLIP, the user's own factory).

`from guided_diffusion_rcdm.encoders import EncoderSpec, encode_images` is the way in.
"""

from .adapters import SOURCES, MissingPackageError, source_of, split_name
from .spec import (
    FLAGS,
    INPUT_NORMALIZATIONS,
    POOLINGS,
    RECORD_KEYS,
    SAMPLE_FILE_KEYS,
    Encoded,
    EncoderSpec,
    Images,
    UnreadableImageError,
    check_paths_exist,
    encode_images,
    encode_views,
    given_fields,
    record_fields,
    sample_file_record,
)

__all__ = [
    "FLAGS", "INPUT_NORMALIZATIONS", "POOLINGS", "RECORD_KEYS", "SAMPLE_FILE_KEYS", "SOURCES", "Encoded",
    "EncoderSpec", "Images", "MissingPackageError", "UnreadableImageError", "check_paths_exist",
    "encode_images", "encode_views", "given_fields", "record_fields", "sample_file_record", "source_of",
    "split_name",
]
