"""LoRA adapters on the transformer, chosen per row: requests with different adapters share one transformer
call, each row getting its own low-rank deltas on top of the shared base matmul (punica / S-LoRA style).
The package: `adapters` (the shared types), `files` (reading one), `bank` (the slots and the wrapped
Linears), `registry` (the names a server may load), `residency` (which stay loaded), `loader` (bringing them in).

Files are read by diffusers' own `FluxLoraLoaderMixin.lora_state_dict`, which converts the FLUX LoRA layouts
in the wild (diffusers/PEFT, kohya sd-scripts, XLabs, BFL control, fal Kontext) to diffusers' keys; fluxray
never converts keys itself. Safetensors only. Each adapter becomes, per target Linear, a pair A (r, in) and
B (out, r) with its alpha / r folded into B, the scaling PEFT applies (`lora_alpha / r`, alpha = r when the
file has none).

`attach_loras(transformer)` gives the transformer one `LoraBank`; adding an adapter wraps the Linears it
targets (only those, once each) in `LoraLinear` and copies its pairs into a free slot of the bank. Before a
call the step function gives the bank the rows' adapters (`LoraBank.select`: slot indices and scales per
row); each wrapped Linear then adds `scale * (x @ A_slot^T) @ B_slot^T` for each of its row's slots, as two
batched products over the rows (a gathered low-rank delta per row on top of the shared base matmul). Slot 0
is all zeros: a row without adapters adds exact zeros. See LoraBank for what keeps shapes fixed under
torch.compile.
"""

from fluxray.lora.adapters import (
    MAX_FILE_BYTES,
    MAX_LORAS_PER_ROW,
    MAX_RANK,
    LoraAdapter,
    LoraChoice,
    LoraError,
    LoraSlots,
)
from fluxray.lora.bank import LoraBank, LoraLinear, attach_loras, linear_like, wrap_targets
from fluxray.lora.files import check_lora_file, read_lora
from fluxray.lora.loader import AdapterLoader
from fluxray.lora.registry import LoraRegistry
from fluxray.lora.residency import HostCache, LoraResidency, make_room

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_LORAS_PER_ROW",
    "MAX_RANK",
    "AdapterLoader",
    "HostCache",
    "LoraAdapter",
    "LoraBank",
    "LoraChoice",
    "LoraError",
    "LoraLinear",
    "LoraRegistry",
    "LoraResidency",
    "LoraSlots",
    "attach_loras",
    "check_lora_file",
    "linear_like",
    "make_room",
    "read_lora",
    "wrap_targets",
]
