"""Small utilities every layer may use: errors, atomic writes, byte units, strict data checks."""
