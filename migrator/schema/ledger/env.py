"""Alembic's entry point for this history (see migrator.schema.history)."""

from alembic import context

from migrator.schema.history import run_env

run_env(context)
