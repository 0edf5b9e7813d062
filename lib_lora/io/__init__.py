"""File input/output: safetensors (atomic saves, validated loads), metadata, hashes."""
from lib_lora.io.hashes import (
    addnet_hash,
    legacy_hash_of_bytes,
    model_hash,
    precalculate_hashes,
    sha256_file,
    short_hash,
)
from lib_lora.io.safetensors_io import (
    LoadedFile,
    load_file,
    load_state_dict,
    read_header,
    read_metadata,
    remove_stale_temporaries,
    save_file,
    temp_prefix,
)

__all__ = [
    "LoadedFile",
    "addnet_hash",
    "legacy_hash_of_bytes",
    "load_file",
    "load_state_dict",
    "model_hash",
    "precalculate_hashes",
    "read_header",
    "read_metadata",
    "remove_stale_temporaries",
    "save_file",
    "sha256_file",
    "short_hash",
    "temp_prefix",
]
