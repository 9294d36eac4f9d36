"""Calibration: measured runs stored, and the estimate fitted to them."""
