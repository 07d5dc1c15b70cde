"""Layers of the versioned page store: in-memory, delta and image layers and the layer map."""
