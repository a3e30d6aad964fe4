"""The RPM spec parses (Debian's rpm, as on CI), and names files that exist and a version
that matches the code; the shipped config validates."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import reqpmd

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "reqpm.spec"


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
