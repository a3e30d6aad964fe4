"""Every Redis key reqpm uses, built in one place.

All keys of a namespace share the hash tag ``{namespace}`` so multi-key Lua scripts
stay on one slot of a Redis Cluster. The one template is ``{namespace}:<name>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Highest priority magnitude the waiters' score packing allows: 1000 * 2^42 < 2^53.
# Here, not in scripts, so reqpmctl can read it without importing the settings schema.
MAX_PRIORITY = 1000

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fullmatch: no trailing newline


def validate_namespace(namespace: str) -> str:
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(
            f"namespace {namespace!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return namespace


@dataclass(frozen=True)
class SlotKeys:
    """Keys of the build-slot limiter, in the order every limiter script takes them."""

    holders: str  # ZSET slot name -> lease expiry (ms, Redis clock)
    holder_info: str  # HASH slot name -> JSON record of the holder
    waiters: str  # ZSET slot name -> queue order (priority, then arrival)
    waiter_leases: str  # ZSET slot name -> waiter lease expiry (ms, Redis clock)
    waiter_info: str  # HASH slot name -> JSON record of the waiter
    meta: str  # HASH: token and seq counters, run_id of the server, grace_until
    grants: str  # pub/sub channel announcing each grant (a channel, not a key)
    # the fair share between groups (projects): see scripts.py
    group_queue: str  # ZSET, all scores 0: "<group> <order> <name>" of each waiter
    ready: str  # ZSET group -> start tag (virtual time) of groups with waiters, under cap
    parked: str  # ZSET group -> start tag of groups with waiters that are at their cap
    shares: str  # HASH group -> "<max_concurrent> <weight>" where not the default
    idle: str  # ZSET group -> tag of groups without waiters that are ahead of their share

    def as_list(self) -> list[str]:
        return [
            self.holders,
            self.holder_info,
            self.waiters,
            self.waiter_leases,
            self.waiter_info,
            self.meta,
            self.grants,
            self.group_queue,
            self.ready,
            self.parked,
            self.shares,
            self.idle,
        ]


def _key(namespace: str, name: str) -> str:
    return f"{{{namespace}}}:{name}"


def slot_keys(namespace: str) -> SlotKeys:
    validate_namespace(namespace)
    return SlotKeys(
        holders=_key(namespace, "slots:holders"),
        holder_info=_key(namespace, "slots:holder_info"),
        waiters=_key(namespace, "slots:waiters"),
        waiter_leases=_key(namespace, "slots:waiter_leases"),
        waiter_info=_key(namespace, "slots:waiter_info"),
        meta=_key(namespace, "slots:meta"),
        grants=_key(namespace, "slots:grants"),
        group_queue=_key(namespace, "slots:group_queue"),
        ready=_key(namespace, "slots:ready"),
        parked=_key(namespace, "slots:parked"),
        shares=_key(namespace, "slots:shares"),
        idle=_key(namespace, "slots:idle"),
    )


def grant_channel(grants: str, listener: str) -> str:
    """The channel of one limiter's grants: the shared grants channel, ':', and the
    listener id that starts its waiters' owners ("<listener>.<hex>"). The grant script
    builds the same name from the owner (``publish_grant`` in scripts.py): a channel, not
    a key, and it keeps the namespace's hash tag."""
    return f"{grants}:{listener}"


def hosts_key(namespace: str) -> str:
    """HASH host_id -> JSON heartbeat of each daemon sharing the namespace."""
    validate_namespace(namespace)
    return _key(namespace, "hosts")


def host_stats_key(namespace: str) -> str:
    """HASH host_id -> JSON of each daemon's figures for the standard windows (what
    `stats --cluster` merges). Apart from the heartbeats, which every scrape, `hosts` and
    `top` read: these are the bulk of a host's record and only `stats --cluster` needs them."""
    validate_namespace(namespace)
    return _key(namespace, "host_stats")
