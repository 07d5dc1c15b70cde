"""The web console (`neon console`): aiohttp routes, sessions, the snapshot graph, templates."""
