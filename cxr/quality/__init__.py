"""Checks of the pipeline against inputs nobody planned for: damaged, mutated and hostile files."""
