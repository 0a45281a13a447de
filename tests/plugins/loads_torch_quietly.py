"""Loads torch without keeping a name for it: only the modules loaded during its import show it."""

import importlib

importlib.import_module("torch")
