"""sftc: supervised fine-tuning compiled into locked, reproducible run bundles."""

__version__ = "0.1.0"
