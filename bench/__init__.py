"""Benchmarks: the tool's phases against a raw COPY pipe, in the same run, as ratios."""
