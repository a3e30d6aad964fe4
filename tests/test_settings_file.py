"""Editing the config file in place: comments, order and the file itself survive."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from reqpmd.config import parse
from reqpmd.config.file import edit_text, render, write_changes

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "reqpm" / "reqpmd.yaml"

CONFIG = """\
# reqpmd configuration
# max_concurrent_builds: builds running at once; an integer from 1 to 20

max_concurrent_builds: 4   # raised for the farm
namespace: reqpm

# the daemon
#redis_url: embedded
sync_interval_hours: 6
"""


def test_render_gives_yaml_scalars() -> None:
    assert render(True) == "true"
    assert render(6) == "6"
    assert render(2.5) == "2.5"
    assert render("embedded") == "embedded"
    assert render("0755") == "'0755'"  # would read back as a number unquoted
    assert render(Path("/var/lib/reqpm")) == "/var/lib/reqpm"


def test_replacing_a_value_keeps_everything_else_byte_for_byte() -> None:
    out = edit_text(CONFIG, {"namespace": "farm"})
    assert out == CONFIG.replace("namespace: reqpm\n", "namespace: farm\n")


def test_replacing_a_value_keeps_its_trailing_comment() -> None:
    out = edit_text(CONFIG, {"max_concurrent_builds": 8})
    assert "max_concurrent_builds: 8   # raised for the farm\n" in out
    assert out.splitlines()[3] == "max_concurrent_builds: 8   # raised for the farm"
    assert len(out.splitlines()) == len(CONFIG.splitlines())


def test_comments_blank_lines_and_key_order_are_kept() -> None:
    out = edit_text(CONFIG, {"sync_interval_hours": 12, "max_concurrent_builds": 2})
    old_lines, new_lines = CONFIG.splitlines(), out.splitlines()
    assert len(old_lines) == len(new_lines)
    for old, new in zip(old_lines, new_lines, strict=True):
        if old.startswith("#") or not old.strip():
            assert new == old
    keys = [line.split(":")[0] for line in new_lines if line and not line.startswith("#")]
    assert keys == ["max_concurrent_builds", "namespace", "sync_interval_hours"]
    assert yaml.safe_load(out) == {
        "max_concurrent_builds": 2,
        "namespace": "reqpm",
        "sync_interval_hours": 12,
    }


def test_a_commented_out_default_is_set_on_its_own_line() -> None:
    out = edit_text(CONFIG, {"redis_url": "redis://r.example:6379/0"})
    lines = out.splitlines()
    assert lines[7] == "redis_url: 'redis://r.example:6379/0'"
    assert "#redis_url" not in out
    assert len(lines) == len(CONFIG.splitlines())
    assert yaml.safe_load(out)["redis_url"] == "redis://r.example:6379/0"


def test_a_documentation_comment_is_never_touched() -> None:
    # "# key: text" documents the key; only "#key: value" is a commented-out setting
    text = "# cleanup_repos_after_days: days unused clones are kept; 1 to 90\nnamespace: x\n"
    out = edit_text(text, {"cleanup_repos_after_days": 14})
    assert out == text + "cleanup_repos_after_days: 14\n"


def test_the_documentation_comment_stays_when_the_setting_line_is_set() -> None:
    text = "# sync_interval_hours: hours between syncs\n#sync_interval_hours: 6\n"
    out = edit_text(text, {"sync_interval_hours": 3})
    assert out == "# sync_interval_hours: hours between syncs\nsync_interval_hours: 3\n"


def test_an_active_key_wins_over_a_commented_out_one() -> None:
    text = "#namespace: reqpm\nnamespace: a\n"
    assert edit_text(text, {"namespace": "b"}) == "#namespace: reqpm\nnamespace: b\n"


def test_an_absent_key_is_appended() -> None:
    out = edit_text(CONFIG, {"cleanup_builds_after_days": 60})
    assert out == CONFIG + "cleanup_builds_after_days: 60\n"


def test_appending_to_a_file_without_a_final_newline() -> None:
    assert edit_text("namespace: x", {"host_id": "b1"}) == "namespace: x\nhost_id: b1\n"
    assert edit_text("", {"host_id": "b1"}) == "host_id: b1\n"


def test_a_key_that_is_a_prefix_of_another_is_not_confused() -> None:
    text = "max_build_retries_x: 1\nmax_build_retries: 3\n"
    out = edit_text(text, {"max_build_retries": 5})
    assert out == "max_build_retries_x: 1\nmax_build_retries: 5\n"


def test_crlf_line_endings_are_kept() -> None:
    text = "namespace: a  # c\r\nhost_id: b\r\n"
    assert edit_text(text, {"namespace": "z"}) == "namespace: z  # c\r\nhost_id: b\r\n"


@pytest.mark.parametrize(
    ("line", "comment"),
    [
        ("redis_url: 'rediss://h:6380/0#x'  # shared\n", "  # shared"),
        ('redis_url: "redis://h/0 # x"  # shared\n', "  # shared"),
        ("redis_url: redis://h/0#x\n", ""),
    ],
)
def test_a_value_holding_a_hash_is_replaced_not_duplicated(line: str, comment: str) -> None:
    out = edit_text(line, {"redis_url": "embedded"})
    assert out == f"redis_url: embedded{comment}\n"


def test_a_long_value_stays_on_one_line() -> None:
    long_path = "/srv/" + "a b " * 40 + "end"
    out = edit_text("mock_root_dir: /x  # big disk\n", {"mock_root_dir": long_path})
    assert out.count("\n") == 1
    assert out.endswith("  # big disk\n")
    assert yaml.safe_load(out) == {"mock_root_dir": long_path}


# -- write_changes -----------------------------------------------------------------------


def test_write_changes_writes_the_new_values(tmp_path: Path) -> None:
    path = tmp_path / "reqpmd.yaml"
    path.write_text(CONFIG)
    write_changes(path, {"max_concurrent_builds": 9, "auto_sync_projects": False})
    assert path.read_text() == (
        CONFIG.replace("max_concurrent_builds: 4 ", "max_concurrent_builds: 9 ")
        + "auto_sync_projects: false\n"
    )
    s = parse.load(path, environ={})
    assert (s.max_concurrent_builds, s.auto_sync_projects) == (9, False)


def test_write_changes_keeps_the_owner_and_never_lets_group_or_others_read(
    tmp_path: Path,
) -> None:
    """The config may hold a Redis password: a rewrite keeps its owner and group, and
    whatever mode it had, drops every group and other bit (a 0640 root:reqpm file let
    every reqpmctl user read the password)."""
    path = tmp_path / "reqpmd.yaml"
    path.write_text(CONFIG)
    path.chmod(0o640)
    before = path.stat()
    write_changes(path, {"namespace": "farm"})
    after = path.stat()
    assert stat.S_IMODE(after.st_mode) == 0o600
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # a new file renamed over the old one


def test_write_changes_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "reqpmd.yaml"
    path.write_text(CONFIG)
    write_changes(path, {"namespace": "farm"})
    write_changes(path, {"host_id": "b1"})
    assert sorted(os.listdir(tmp_path)) == ["reqpmd.yaml"]


def test_write_changes_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # when the rename fails, the old file is untouched and the temp file is gone
    path = tmp_path / "reqpmd.yaml"
    path.write_text(CONFIG)

    def fail(src: str, dst: str) -> None:
        assert Path(src).parent == tmp_path  # the temp file is next to the config
        assert Path(src).read_text() == edit_text(CONFIG, {"namespace": "farm"})
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_changes(path, {"namespace": "farm"})
    assert path.read_text() == CONFIG
    assert sorted(os.listdir(tmp_path)) == ["reqpmd.yaml"]


def test_write_changes_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "reqpmd.yaml"
    write_changes(path, {"max_concurrent_builds": 3})
    assert path.read_text() == "max_concurrent_builds: 3\n"
    assert sorted(os.listdir(tmp_path)) == ["reqpmd.yaml"]


def test_write_changes_refuses_an_edit_that_would_read_back_differently(tmp_path: Path) -> None:
    # the key twice: the edit changes the first, YAML reads the last
    path = tmp_path / "reqpmd.yaml"
    text = "namespace: a\nnamespace: b\n"
    path.write_text(text)
    with pytest.raises(RuntimeError, match="refusing to write"):
        write_changes(path, {"namespace": "c"})
    assert path.read_text() == text
    assert sorted(os.listdir(tmp_path)) == ["reqpmd.yaml"]


def test_write_changes_writes_paths_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "reqpmd.yaml"
    path.write_text("#state_dir: /var/lib/reqpm\n")
    write_changes(path, {"state_dir": Path("/srv/reqpm")})
    assert path.read_text() == "state_dir: /srv/reqpm\n"


def test_changing_the_shipped_config_keeps_every_comment(tmp_path: Path) -> None:
    path = tmp_path / "reqpmd.yaml"
    shutil.copyfile(SHIPPED, path)
    original = path.read_text()
    write_changes(path, {"max_concurrent_builds": 12})

    s = parse.load(path, environ={})
    assert s.max_concurrent_builds == 12
    text = path.read_text()
    comments = [line for line in original.splitlines() if line.startswith("#")]
    kept = set(text.splitlines())
    missing = [c for c in comments if c not in kept]
    assert missing == ["#max_concurrent_builds: 4"]  # the one commented-out line, now set
    assert text == original.replace(
        "\n#max_concurrent_builds: 4\n", "\nmax_concurrent_builds: 12\n"
    )
    # and nothing else changed meaning
    others = {k: v for k, v in s.as_dict().items() if k != "max_concurrent_builds"}
    defaults = parse.load(SHIPPED, environ={}).as_dict()
    assert others == {k: v for k, v in defaults.items() if k != "max_concurrent_builds"}


def test_changing_the_shipped_config_twice_edits_the_same_line(tmp_path: Path) -> None:
    path = tmp_path / "reqpmd.yaml"
    shutil.copyfile(SHIPPED, path)
    write_changes(path, {"max_concurrent_builds": 12})
    once = path.read_text()
    write_changes(path, {"max_concurrent_builds": 3})
    assert path.read_text() == once.replace(
        "max_concurrent_builds: 12\n", "max_concurrent_builds: 3\n"
    )
    assert parse.load(path, environ={}).max_concurrent_builds == 3
