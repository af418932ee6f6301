"""Residency Migrator: moves users' data to the data center their residency requires."""

__version__ = "0.1.0"
