"""fluxray: FLUX.1 text-to-image generation, the engine shared by the online service and the offline job."""

__version__ = "0.1.0"
