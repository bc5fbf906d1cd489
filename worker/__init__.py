"""The worker process: one per client, serving its server-side blocks."""
