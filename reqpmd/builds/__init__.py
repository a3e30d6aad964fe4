"""Builds on this host: states (the edges) and lifecycle (which edge an outcome takes),
store (SQLite queue and history) and layout (where a build's files live), scheduler
(queue -> gates -> slot -> run), run (one build's mock steps and scrub), mock (command
lines), process (process groups and the stop ladder), gates (may this host take a slot)."""
