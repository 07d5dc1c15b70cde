"""Reconstruction: any key at any LSN from an image and the deltas above it, with redo."""
