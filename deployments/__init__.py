"""Ray Serve deployments of fluxray: text encoders, denoiser, VAE decoder and the HTTP ingress.

`deployments.app:build_app` is the import_path of every serve config in deployments/configs/.
"""
