"""The built-in CLI commands, one module each."""
