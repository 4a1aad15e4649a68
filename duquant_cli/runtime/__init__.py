"""Runtime: the DuQuant layer module and the loader that swaps it into a model."""
