"""Commands as library functions that return data; the CLI only formats what they return."""
