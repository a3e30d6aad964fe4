"""The cluster-wide build-slot limiter on Redis.

limiter (the client, BuildConcurrencyLimiter) -> waiter (one blocking acquisition),
grants (one pub/sub listener), heartbeat (lease renewals) -> scripts (Lua, one per state
change) and keys (every key name) -> connection (the client policy). server runs a
private redis-server: the daemon's embedded default, and every test's own.
"""
