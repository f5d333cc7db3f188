"""msa: a mail submission agent. See docs/ARCHITECTURE.md and msa(8)."""

__version__ = "0.1.0"
