"""The tool's own tables: their declaration (`tables`) and their history (`history`)."""

SCHEMA = "migrator"  # the schema they live in, in every store
