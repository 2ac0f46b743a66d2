"""Run-directory workflows: what the CLI does, on top of the trainer and the deployment core.

- ``train_run``: train a recipe into a run directory, resume it, evaluate it;
- ``export_run``: export a run's checkpoint for a target and validate it; validate a model file;
- ``compare``: one recipe under several optimizers and seeds, as tables and plots.
"""
