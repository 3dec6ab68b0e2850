"""fluxray: FLUX.1 text-to-image generation, the engine shared by the online service and the offline job."""

import os

# fluxray never downloads at run time, and says nothing through transformers' and the hub's
# progress bars. huggingface_hub reads these when it is first imported, which every fluxray module
# does after this package's __init__ has run: this is the one place they are set (a user's own
# value wins).
QUIET_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
for _name, _value in QUIET_OFFLINE_ENV.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
