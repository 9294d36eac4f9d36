"""What exists, read from files and the machine: model profiles, the GPU catalogue, the probe, datasets and their token lengths."""
