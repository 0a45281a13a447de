"""Plugins for the plugin host's tests: one good plugin with a worker task of its own, and
plugins that each break one rule (the tests load them by module path, as an app would)."""
