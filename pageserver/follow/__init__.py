"""Following nodes: one walreceiver process per node, its WAL archive, and the decode thread."""
