"""Reading a POST /v1/images/edits body: OpenAI's multipart form (`image` or `image[]` files, `mask`, the
other fields as text) or JSON with the images as base64 or data: URLs. Only reading: what the image may be
and what it means is fluxray.images' and fluxray.editing's."""

import base64
import binascii
import json
import re

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from deployments.http.errors import APIError
from deployments.http.protocol import ImageEditRequest
from fluxray.params import describe_validation_error

FILE_FIELDS = ("image", "image[]", "mask")
JSON_FORM_FIELDS = ("loras",)  # a list in a form: sent as JSON text, e.g. loras='[{"name": "ink"}]'
MAX_FORM_FIELDS = 64
MAX_FORM_FILES = 17  # OpenAI takes up to 16 images and a mask; fluxray's models use one image
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def invalid(error: ValidationError) -> APIError:
    first = error.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None
    return APIError(400, describe_validation_error(error), param)


def decode_base64(value: str, field: str) -> bytes:
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{field}: not base64 or a base64 data: URL", field) from None


async def read_edit_body(request: Request) -> tuple[ImageEditRequest, list[bytes], bytes | None]:
    """The request's fields, its image files' bytes (in order) and its mask's bytes (or None)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_form(request)
    if content_type in ("application/json", ""):
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            fields = ImageEditRequest.model_validate(body)
        except ValidationError as error:
            raise invalid(error) from None
        images = fields.image if isinstance(fields.image, list) else [fields.image] if fields.image else []
        files = [decode_base64(image, "image") for image in images]
        mask = decode_base64(fields.mask, "mask") if fields.mask else None
        return fields.model_copy(update={"image": None, "mask": None}), files, mask
    raise APIError(415, f"Content-Type {content_type!r}: send multipart/form-data or application/json")


async def _read_form(request: Request) -> tuple[ImageEditRequest, list[bytes], bytes | None]:
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except Exception as error:  # noqa: BLE001 - Starlette raises several types for a malformed form
        raise APIError(400, f"malformed multipart form ({type(error).__name__})") from None
    fields: dict[str, str] = {}
    images: list[bytes] = []
    mask: bytes | None = None
    for key, value in form.multi_items():
        if key in FILE_FIELDS:
            field = "mask" if key == "mask" else "image"
            data = await value.read() if isinstance(value, UploadFile) else decode_base64(value, field)
            if field == "mask":
                if mask is not None:
                    raise APIError(400, "mask: send one mask", "mask")
                mask = data
            else:
                images.append(data)
        elif isinstance(value, UploadFile):
            raise APIError(400, f"{key}: a file where a value was expected", key)
        elif key in fields:
            raise APIError(400, f"{key}: sent twice", key)
        elif key in JSON_FORM_FIELDS:
            try:
                fields[key] = json.loads(value)
            except ValueError:
                raise APIError(400, f"{key}: not JSON (a form field carries it as JSON text)", key) from None
        else:
            fields[key] = value
    await form.close()
    try:
        return ImageEditRequest.model_validate(fields), images, mask
    except ValidationError as error:
        raise invalid(error) from None
