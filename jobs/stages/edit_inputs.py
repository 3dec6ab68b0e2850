"""An edit row's inputs between the stages: its files read (a key under the input's folder, or an s3://
URI), and its encoded latent distributions packed as safetensors bytes (their method travels in the row's
edit_method column)."""

from __future__ import annotations

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fluxray.editing import EncodedEdit
from fluxray.images import InputImageError
from fluxray.storage import open_storage


def read_input(uri: str, input_root: str, endpoint_url: str | None, field: str) -> bytes:
    """An edit's input file: an s3:// URI as it is, anything else a key under the input's folder;
    InputImageError naming the field and the file when it cannot be read."""
    try:
        if uri.startswith("s3://"):
            folder, _, name = uri.removeprefix("s3://").rpartition("/")
            return open_storage(f"s3://{folder}/", endpoint_url).get(name)
        return open_storage(input_root, endpoint_url).get(uri)
    except Exception as error:  # noqa: BLE001 - missing, forbidden, unreachable: the row's reason
        raise InputImageError(field, f"cannot read {uri} ({type(error).__name__})") from None


def pack_edit(encoded: EncodedEdit) -> bytes:
    """An encoded edit's tensors as safetensors bytes (its method travels in the row's edit_method)."""
    tensors = {"image_moments": encoded.image_moments}
    if encoded.mask is not None:
        tensors["mask"] = encoded.mask
    if encoded.masked_moments is not None:
        tensors["masked_moments"] = encoded.masked_moments
    return save_tensors({k: t.contiguous() for k, t in tensors.items()})


def unpack_edit(data: bytes, method: str) -> EncodedEdit:
    tensors = load_tensors(data)
    return EncodedEdit(method, tensors["image_moments"], tensors.get("mask"), tensors.get("masked_moments"))
