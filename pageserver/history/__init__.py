"""History: per-storage node stores, named snapshots, PITR areas."""
