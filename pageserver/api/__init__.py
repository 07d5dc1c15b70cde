"""The pageserver's faces: proto methods, HTTP status and metrics, and the service they share."""
