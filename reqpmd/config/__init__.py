"""Settings: schema (the typed Settings and every key's rule) -> parse (YAML to Settings)
-> file (edits that keep an admin's comments) -> transaction (lock, validate, write,
apply, audit, and tell whoever cares)."""
