"""Hydra discovers plugins under the ``hydra_plugins`` namespace; this one only adds a config search path."""
