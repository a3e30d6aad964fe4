"""The RPM spec parses (Debian's rpm, as on CI), and names files that exist and a version
that matches the code; the shipped config validates; the spec, the units, sysusers and
tmpfiles agree on who owns what (the sandbox in test_systemd_units.py installs it for real)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import reqpmd
from reqpmd.config.schema import BY_NAME

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "reqpm.spec"
UNITS = ROOT / "systemd"
# the values Fedora's rpm gives the macros the spec's paths use (Debian's rpm differs:
# its %{_sharedstatedir} is /usr/com)
FEDORA_MACROS = {
    "_sysconfdir": "/etc",
    "_sharedstatedir": "/var/lib",
    "_rundir": "/run",
    "_bindir": "/usr/bin",
    "_unitdir": "/usr/lib/systemd/system",
    "_sysusersdir": "/usr/lib/sysusers.d",
    "_tmpfilesdir": "/usr/lib/tmpfiles.d",
}


def fedora_expand(text: str) -> str:
    """``text`` with the spec's path macros expanded as on Fedora."""
    out = re.sub(r"%\{(\w+)\}", lambda m: FEDORA_MACROS.get(m.group(1), m.group(0)), text)
    assert "%{" not in out, out
    return out


def spec_section(name: str) -> str:
    """The body of one section of the spec (``%files``, ``%post`` ...), up to the next one."""
    sections = ("prep", "generate_buildrequires", "build", "install", "check", "pre", "post")
    sections += ("preun", "postun", "files", "changelog", "description")
    heads = "|".join(sections)
    m = re.search(rf"^%{name}\b[^\n]*\n(.*?)(?=^%(?:{heads})\b|\Z)", SPEC.read_text(), re.M | re.S)
    assert m, name
    return m.group(1)


def spec_file_attrs() -> dict[str, tuple[str, str, str]]:
    """What the RPM installs with an %attr: {path: (mode, user, group)}, paths as on Fedora."""
    found = re.findall(r"%attr\((\d+),([\w-]+),([\w-]+)\)\s+(\S+)\s*$", spec_section("files"), re.M)
    return {
        fedora_expand(path): (mode.lstrip("0"), user, group) for mode, user, group, path in found
    }


def unit_values(unit: str) -> dict[str, list[str]]:
    """Key -> every value it has in a unit file (comments dropped)."""
    values: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def tmpfiles_dirs() -> dict[str, tuple[str, str, str]]:
    """reqpm.tmpfiles's d lines: {path: (mode, user, group)}."""
    dirs = {}
    for line in (UNITS / "reqpm.tmpfiles").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "d":
            dirs[fields[1]] = (fields[2].lstrip("0"), fields[3], fields[4])
    return dirs


@pytest.mark.skipif(
    shutil.which("rpmspec") is None,
    reason="rpmspec not installed (Debian/Fedora package 'rpm'; ./dev test "
    "installs it when run as root)",
)
def test_spec_parses_with_rpmspec() -> None:
    r = subprocess.run(["rpmspec", "-P", str(SPEC)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "error:" not in r.stderr
    assert "Name:           reqpm" in r.stdout
    r = subprocess.run(
        ["rpmspec", "-q", "--qf", "%{VERSION}\n", str(SPEC)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == reqpmd.__version__


def test_spec_follows_the_packaging_rules_and_names_real_files() -> None:
    text = SPEC.read_text()
    version = re.search(r"^Version:\s*(\S+)", text, re.M)
    assert version and version.group(1) == reqpmd.__version__
    for macro in (
        "%pyproject_wheel",
        "%pyproject_install",
        "%pyproject_buildrequires",
        "%systemd_post reqpmd.service",
        "%systemd_preun reqpmd.service",
        "%systemd_postun_with_restart reqpmd.service",
        "%sysusers_create_compat",
        "%config(noreplace)",
    ):
        assert macro in text
    for path in re.findall(r"install -Dpm \d+ (\S+) ", text):
        assert (ROOT / path).is_file(), path
    for path in ("LICENSE", "README.md", "docs"):
        assert (ROOT / path).exists()


def test_shipped_config_passes_check_config() -> None:
    for cfg in ("etc/reqpm/reqpmd.yaml", "etc/reqpm/dev.yaml"):
        r = subprocess.run(
            [sys.executable, "-m", "reqpmd.daemon", "--check-config", str(ROOT / cfg)],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith("OK")


# -- who owns what ---------------------------------------------------------------------


def test_the_daemon_has_its_own_group_and_the_socket_group_is_for_users() -> None:
    """Group reqpm is everyone who may run reqpmctl: the daemon's files must not be theirs."""
    service, socket_unit = unit_values("reqpmd.service"), unit_values("reqpmd.socket")
    assert service["User"] == ["reqpmd"] and service["Group"] == ["reqpmd"]
    assert service["SupplementaryGroups"][0].split() == ["mock", "reqpm"]
    assert socket_unit["SocketUser"] == ["reqpmd"]
    assert socket_unit["SocketGroup"] == ["reqpm"] == [BY_NAME["socket_group"].default]
    assert socket_unit["SocketMode"] == ["0660"]
    sysusers = [line.split() for line in (UNITS / "reqpm.sysusers").read_text().splitlines()]
    sysusers = [fields for fields in sysusers if fields and not fields[0].startswith("#")]
    # reqpmd and its own group reqpmd; in group mock (mock) and reqpm (to chgrp its socket)
    assert ["u", "reqpmd", "-"] in [fields[:3] for fields in sysusers]
    for entry in (["g", "reqpm", "-"], ["g", "reqpm-admin", "-"], ["g", "mock", "-"]):
        assert entry in sysusers
    assert ["m", "reqpmd", "mock"] in sysusers and ["m", "reqpmd", "reqpm"] in sysusers
    assert not [fields for fields in sysusers if fields[:2] == ["u", "reqpm"]]


def test_the_config_is_for_reqpmd_and_root_alone() -> None:
    """It may hold a Redis password: 0600 reqpmd:reqpmd in the spec (files and install), the
    directory 0750; spec, tmpfiles and the unit's *DirectoryMode= agree on every directory."""
    attrs = spec_file_attrs()
    assert attrs["/etc/reqpm/reqpmd.yaml"] == ("600", "reqpmd", "reqpmd")
    assert re.search(
        r"^%config\(noreplace\) %attr\(0600,reqpmd,reqpmd\) ", spec_section("files"), re.M
    )
    installs = re.findall(
        r"^install -Dpm (\d+) etc/reqpm/reqpmd.yaml ", spec_section("install"), re.M
    )
    assert installs == ["0600"]
    dirs = {
        "/etc/reqpm": ("750", "reqpmd", "reqpmd"),
        "/var/lib/reqpm": ("750", "reqpmd", "reqpmd"),
        "/run/reqpm": ("755", "reqpmd", "reqpmd"),
    }
    for path, want in dirs.items():
        assert attrs[path] == want, path
    assert tmpfiles_dirs() == dirs
    service = unit_values("reqpmd.service")
    assert service["ConfigurationDirectoryMode"] == ["0750"]
    assert service["StateDirectoryMode"] == ["0750"]
    assert service["RuntimeDirectoryMode"] == ["0755"]


def test_the_operations_guide_installs_the_config_as_the_package_does() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    installs = re.findall(r"^# install (.*) etc/reqpm/reqpmd\.yaml ", guide, re.M)
    assert installs
    for options in installs:
        assert re.search(r"-D?m ?0?600\b", options), options
        assert "-o reqpmd" in options and "-g reqpmd" in options, options
    # the old modes only in the note on upgrading from them
    current = re.sub(r"^### From 0\.1\.0-1.*?(?=^##)", "", guide, flags=re.M | re.S)
    assert "From 0.1.0-1" not in current
    assert "0640" not in current and "root:reqpm" not in current and "reqpm:reqpm" not in current
    assert "0600 `reqpmd:reqpmd`" in current
