"""The embedded tiny models and their world: the synthetic scenes they were trained on and are scored
against (scenes), the tiny FLUX.1 [dev] model in diffusers' layout (model/), its Fill and Kontext variants
(fill/, kontext/) and its LoRAs (loras/). Every file is made by scripts/make_tiny_model.py,
scripts/train_tiny_model.py and scripts/make_tiny_loras.py."""
