"""Connections to the stores of each data center."""
