"""Where the shared Redis is: the grammar of ``redis_url`` and what a URL says.

One server is a URL redis-py reads itself (``redis://``, ``rediss://``, ``unix://``). A
Sentinel-managed master or a Redis Cluster is named by several servers at once, which no
URL parser splits, so those forms are read here, by the same pattern that validates the
setting: what the validation accepts is what the connection understands.

    redis+sentinel://[user[:password]@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]
    redis+cluster://[user[:password]@]HOST[:PORT][,HOST[:PORT]...]

``rediss+`` uses TLS for every connection (the Sentinels' too). A password may stand in
the URL, but ``redis_password_file`` keeps it out of the config file.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

import redis.connection

SENTINEL_PORT = 26379
REDIS_PORT = 6379

_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::[0-9]{1,5})?"
_HOSTS = rf"{_HOST}(?:,{_HOST})*"
# the user part is greedy up to the last '@' before the hosts: a password may hold '@' or '/'
_SENTINEL = rf"(?P<s_tls>rediss?)\+sentinel://(?:(?P<s_user>\S*)@)?(?P<s_hosts>{_HOSTS})/(?P<master>[A-Za-z0-9._-]{{1,64}})(?:/(?P<db>[0-9]{{1,2}}))?"
_CLUSTER = rf"(?P<c_tls>rediss?)\+cluster://(?:(?P<c_user>\S*)@)?(?P<c_hosts>{_HOSTS})/?"
_SINGLE = r"(?:redis|rediss|unix)://\S+"
# Used with fullmatch() (schema.Field.convert): "$" would also match before a newline.
URL_RE = re.compile(rf"embedded|{_SINGLE}|{_SENTINEL}|{_CLUSTER}")
URL_DOC = (
    "'embedded', or a URL shared by all hosts: redis://, rediss:// or unix:// (one server), "
    "redis+sentinel://[user@]HOST:PORT[,HOST:PORT...]/MASTER[/DB] (the master Sentinels "
    "name) or redis+cluster://[user@]HOST:PORT[,HOST:PORT...] (a Redis Cluster); "
    "rediss+sentinel:// and rediss+cluster:// for TLS"
)

Kind = Literal["embedded", "single", "sentinel", "cluster"]


@dataclass(frozen=True)
class RedisAddress:
    kind: Kind
    url: str  # as given (single: what redis-py reads)
    nodes: tuple[tuple[str, int], ...] = ()  # the Sentinels, or the Cluster's first nodes
    master: str = ""  # sentinel: the monitored master's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse(url: str) -> RedisAddress:
    """What ``url`` names; ValueError for one the setting would refuse."""
    m = URL_RE.fullmatch(url)
    if m is None:
        raise ValueError(f"not a Redis URL ({URL_DOC})")
    if url == "embedded":
        return RedisAddress("embedded", url)
    if m["master"] is not None:
        user, pw = _credentials(m["s_user"])
        return RedisAddress(
            "sentinel",
            url,
            _nodes(m["s_hosts"], SENTINEL_PORT),
            m["master"],
            int(m["db"] or 0),
            user,
            pw,
            m["s_tls"] == "rediss",
        )
    if m["c_hosts"] is not None:
        user, pw = _credentials(m["c_user"])
        nodes = _nodes(m["c_hosts"], REDIS_PORT)
        return RedisAddress("cluster", url, nodes, "", 0, user, pw, m["c_tls"] == "rediss")
    try:
        # read as the client will read it: a URL it cannot read is refused now, with a
        # message of ours (its own may quote the password: "port ... as 'hunter2'")
        options = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError) as exc:
        raise ValueError(
            "not a URL the Redis client can read (check the host, the port and the "
            "database; a password with '/', '@', ':' or '?' must be %-escaped)"
        ) from exc
    password = options.get("password")
    return RedisAddress(
        "single",
        url,
        username=options.get("username") or None,
        password=password if password is not None else None,
        tls=url.startswith("rediss://"),
    )


def _credentials(userinfo: str | None) -> tuple[str | None, str | None]:
    """user and password of ``user[:password]``, percent-decoded as redis-py decodes
    them; an empty user is the default one."""
    if not userinfo:
        return None, None
    user, sep, password = userinfo.partition(":")
    return (
        urllib.parse.unquote(user) or None,
        urllib.parse.unquote(password) if sep else None,
    )


def _nodes(hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    out = []
    for node in hosts.split(","):
        if node.startswith("["):
            host, _, rest = node[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = node.partition(":")
        number = int(port) if port else default_port
        if not 1 <= number <= 65535:
            raise ValueError(f"port {number} of {host} is not from 1 to 65535")
        out.append((host, number))
    return tuple(out)
