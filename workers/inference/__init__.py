"""Generation: a per-worker pipeline with the tenant's adapter applied per request (issue 4).

The resident engine with pre-allocated adapter slots, a tiered cache and mixed-adapter batching is
issue 5; this is the simple, correct version the service starts with.
"""
