"""Where the shared Redis is: the grammar of ``redis_url`` and what a URL says.

One server is a URL redis-py reads itself (``redis://``, ``rediss://``, ``unix://``). A
Sentinel-managed master is named by several Sentinels at once, which no URL parser
splits, so that form is read here, by the same pattern that validates the setting: what
the validation accepts is what the connection understands.

    redis+sentinel://[user[:password]@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]

``rediss+sentinel`` uses TLS for every connection (the Sentinels' too). A password may
stand in the URL, but ``redis_password_file`` keeps it out of the config file.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

SENTINEL_PORT = 26379

_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::[0-9]{1,5})?"
_HOSTS = rf"{_HOST}(?:,{_HOST})*"
# the user part is greedy up to the last '@' before the hosts: a password may hold '@' or '/'
_SENTINEL = rf"(?P<s_tls>rediss?)\+sentinel://(?:(?P<s_user>\S*)@)?(?P<s_hosts>{_HOSTS})/(?P<master>[A-Za-z0-9._-]{{1,64}})(?:/(?P<db>[0-9]{{1,2}}))?"
_SINGLE = r"(?:redis|rediss|unix)://\S+"
# Used with fullmatch() (schema.Field.convert): "$" would also match before a newline.
URL_RE = re.compile(rf"embedded|{_SINGLE}|{_SENTINEL}")
URL_DOC = (
    "'embedded', or a URL shared by all hosts: redis://, rediss:// or unix:// (one server), "
    "or redis+sentinel://[user@]HOST:PORT[,HOST:PORT...]/MASTER[/DB] (a master Sentinel "
    "names; rediss+sentinel:// for TLS)"
)

Kind = Literal["embedded", "single", "sentinel"]


@dataclass(frozen=True)
class RedisAddress:
    kind: Kind
    url: str  # as given (single: what redis-py reads)
    nodes: tuple[tuple[str, int], ...] = ()  # the Sentinels
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
    user, password = None, None
    if not url.startswith("unix://"):
        netloc = urllib.parse.urlsplit(url).netloc
        user, password = _credentials(netloc.rpartition("@")[0] if "@" in netloc else None)
    return RedisAddress(
        "single", url, username=user, password=password, tls=url.startswith("rediss://")
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
