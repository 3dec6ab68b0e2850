"""The encode stage: each row's prompts through the text encoders, and an edit row's input image (and mask)
read, checked and through the VAE's encoder."""

from __future__ import annotations

from safetensors.torch import save as save_tensors

from fluxray.editing import edit_method, prepare_edit, read_edit_inputs
from fluxray.images import image_sha256
from fluxray.runtime import stage_runtime
from fluxray.speed import SpeedOptions
from fluxray.text_encoding import TextEncoder
from fluxray.vae import VAEEncoder
from jobs.stages.base import Stage
from jobs.stages.edit_inputs import pack_edit, read_input
from jobs.stages.schema import ENCODED_SCHEMA


class EncodeStage(Stage):
    """Prompts to embeddings (CLIP-L + T5); an edit row's input read, checked and VAE-encoded."""

    name, schema = "encode", ENCODED_SCHEMA

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str | None,
        threads: int | None,
        speed: SpeedOptions | None = None,
        input_root: str = "",
        endpoint_url: str | None = None,
    ):
        self.source, self.device, self.dtype = stage_runtime(model, device, dtype, threads)
        self.encoder = TextEncoder.load(self.source, self.device, self.dtype, speed)
        self.speed, self.input_root, self.endpoint_url = speed, input_root, endpoint_url
        self.image_encoder: VAEEncoder | None = None  # loaded with the first edit row

    def _edit(self, row: dict) -> tuple[bytes, str]:
        """An edit row's input, read, checked and through the VAE's encoder (its sha256s set on the row):
        the packed latent distributions and the edit's method."""
        spec = self.source.spec
        image_data = read_input(row["input_image"], self.input_root, self.endpoint_url, "image")
        mask_data = None
        if row["input_mask"] is not None:
            mask_data = read_input(row["input_mask"], self.input_root, self.endpoint_url, "mask")
        image, mask = read_edit_inputs(spec, image_data, mask_data)
        if mask is not None:
            row["mask_sha256"] = image_sha256(mask)
        row["image_sha256"] = image_sha256(image)
        method = edit_method(spec, mask is not None, None if spec.edit == "kontext" else row["strength"])
        if self.image_encoder is None:
            self.image_encoder = VAEEncoder.load(self.source, self.device, self.dtype, self.speed)
        inputs = prepare_edit(spec, method, image, mask, int(row["width"]), int(row["height"]))
        return pack_edit(self.image_encoder.encode(inputs)), method

    def work(self, rows: list[dict]) -> None:
        embeds = self.encoder.encode([r["prompt"] for r in rows], [r["prompt_2"] for r in rows])
        cfg = [k for k, r in enumerate(rows) if r["negative_prompt"] and r["true_cfg_scale"] > 1]
        negatives = self.encoder.encode([rows[k]["negative_prompt"] for k in cfg]) if cfg else None
        for k, row in enumerate(rows):
            row["truncated"] = ",".join(self.encoder.length.truncated(row["prompt"], row["prompt_2"]))
            tensors = {"pooled": embeds.pooled[k], "sequence": embeds.sequence[k]}
            if k in cfg:
                j = cfg.index(k)
                tensors |= {"neg_pooled": negatives.pooled[j], "neg_sequence": negatives.sequence[j]}
            row["embeds"] = save_tensors({name: t.to("cpu", self.dtype).contiguous() for name, t in tensors.items()})
            row["edit"], row["edit_method"] = self._edit(row) if row["input_image"] is not None else (None, None)
