"""One-command studies, each run from the repository root as `python -m experiments.<name>`."""
