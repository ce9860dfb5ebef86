"""Datasets: registry, download, parsing, preparation into the sharded on-disk layout, and reading it back."""
