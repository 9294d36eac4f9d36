"""Errors that reach the user as one line, never as a traceback."""


class AutotuneError(Exception):
    """A problem with the user's input or environment, reported as ``autotune: error: ...``."""

    exit_code = 1


class PluginError(AutotuneError):
    """A plugin failed or broke its contract; the message names the plugin."""


class DuplicateNameError(PluginError):
    """Two plugins registered an object under the same name."""


class RowError(AutotuneError):
    """A problem inside one dataset row; the reader prefixes the file and the place."""
