"""Model profiles and the GPU catalogue, shipped as data (read with importlib.resources)."""
