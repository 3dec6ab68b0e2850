"""Offline generation with Ray Data: `python -m jobs.generate --input URI --output URI`."""
