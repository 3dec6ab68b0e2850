"""The models fluxray knows and where their weights come from: each FLUX.1 variant's spec (specs), the one
resolver of model sources with safetensors-only loading per stage (sources), and BFL-layout single files
(single_file)."""
