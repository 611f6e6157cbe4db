"""Hydra launcher ``hydra/launcher=processes``: a multirun's jobs as subprocesses, ``n_jobs`` at once
(:mod:`hydra_plugins.recsys_launcher.launcher`)."""
