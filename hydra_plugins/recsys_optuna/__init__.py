"""Hydra plugin package of this project (``hydra_plugins`` is Hydra's namespace for plugins)."""
