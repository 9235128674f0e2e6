"""Model and experiment configs: one Python module per config, each exposing `get_config()`."""
