"""Built-in plugins: registered by the core exactly as an outside plugin would be."""
