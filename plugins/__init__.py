"""Built-in plugins: one module per course topic."""
