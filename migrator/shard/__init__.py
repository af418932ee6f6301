"""What the phases share about a shard: its objects and their manifest (`objects`) and the
comparison of its changed rows on two sides (`compare`)."""
