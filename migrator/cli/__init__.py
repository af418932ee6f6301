"""The `migrator` command line (`main`): verbs that move shards (`shards`), verbs around
the moves (`upkeep`), and what they share (`common`)."""
