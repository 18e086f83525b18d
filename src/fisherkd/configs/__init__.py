"""Configs shipped with the package (the demo's)."""
