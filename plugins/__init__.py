"""Built-in autotune plugins (model families and training stages), installed as autotune_plugins."""

if __name__ != "autotune_plugins":
    raise ImportError(f"import autotune_plugins, not {__name__!r} (run `pip install -e .`)")
