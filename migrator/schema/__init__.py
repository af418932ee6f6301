"""The tool's own tables: their declaration (`tables`) and their history (`history`)."""
