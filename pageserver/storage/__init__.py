"""The page store: keys, values, timelines, layer files, compaction, GC and retention."""
