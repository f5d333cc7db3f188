"""msa: a mail submission agent. See DESIGN in the repository and msa(8)."""

__version__ = "0.1.0"
