"""Command-line interface: ``gpu-refine SUBCOMMAND ...``."""
