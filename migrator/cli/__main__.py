"""`python -m migrator.cli`: the command line, as the `migrator` script runs it."""

from migrator.cli.main import main

main()
