"""The plugin API: hook specifications, the plugin manager, and the registry of families and stages."""
