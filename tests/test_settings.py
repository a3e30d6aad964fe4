"""Settings: defaults, validation of every key, error reporting, and `reqpmd --check-config`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reqpmd.config import parse, schema
from reqpmd.config.schema import SettingsInvalid

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "etc" / "reqpm" / "reqpmd.yaml"
DEV = ROOT / "etc" / "reqpm" / "dev.yaml"

# (key, default, lowest allowed, highest allowed) for the bounded integer settings
INT_RANGES = [
    ("max_concurrent_builds", 4, 1, 20),
    ("cleanup_builds_after_days", 30, 1, 365),
    ("cleanup_repos_after_days", 7, 1, 90),
    ("sync_interval_hours", 6, 1, 24),
    ("repository_sync_interval_minutes", 30, 5, 1440),
]


def write(tmp_path: Path, text: str, name: str = "reqpmd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> schema.Settings:
    return parse.load(write(tmp_path, text), environ={} if environ is None else environ)


def errors_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[Any]:
    with pytest.raises(SettingsInvalid) as info:
        load(tmp_path, text, environ)
    return info.value.errors


def validates(key: str, value: Any) -> bool:
    try:
        parse.validate({key: value}, environ={})
    except SettingsInvalid:
        return False
    return True


# -- defaults ----------------------------------------------------------------------------


def test_defaults_match_the_documented_table() -> None:
    values = vars(parse.validate({}, environ={}))
    assert values["max_concurrent_builds"] == 4
    assert values["cleanup_builds_after_days"] == 30
    assert values["cleanup_repos_after_days"] == 7
    assert values["auto_sync_projects"] is True
    assert values["sync_interval_hours"] == 6
    assert values["repository_sync_interval_minutes"] == 30
    assert values["redis_url"] == "embedded"
    assert values["namespace"] == "reqpm"
    assert values["socket_path"] == Path("/run/reqpm/reqpmd.sock")
    assert values["state_dir"] == Path("/var/lib/reqpm")
    assert values["mock_command"] == Path("/usr/bin/mock")
    assert values["mock_root_dir"] == Path("/var/lib/mock")
    assert values["slot_wait_timeout"] == 300
    assert values["min_free_disk_gb"] == 10


def test_host_id_defaults_to_the_full_hostname() -> None:
    expected = socket.gethostname()
    assert parse.validate({}, environ={}).as_dict()["host_id"] == expected


def test_an_explicit_host_id_wins_over_the_hostname() -> None:
    assert parse.validate({"host_id": "b1"}, environ={}).as_dict()["host_id"] == "b1"


def test_an_empty_file_loads_every_default(tmp_path: Path) -> None:
    s = load(tmp_path, "# nothing set\n")
    assert s.as_dict() == {
        k: str(v) if isinstance(v, Path) else v
        for k, v in parse.validate({}, environ={}).as_dict().items()
    }


def test_settings_are_attributes_and_replace_makes_a_new_object(tmp_path: Path) -> None:
    s = load(tmp_path, "max_concurrent_builds: 7\n")
    assert s.max_concurrent_builds == 7
    t = s.replace(max_concurrent_builds=9)
    assert (s.max_concurrent_builds, t.max_concurrent_builds) == (7, 9)
    assert s.changed(t) == {"max_concurrent_builds": (7, 9)}
    with pytest.raises(AttributeError):
        _ = s.no_such_setting


# -- ranges and types --------------------------------------------------------------------


@pytest.mark.parametrize(("key", "default", "lo", "hi"), INT_RANGES)
def test_integer_bounds_are_inclusive(key: str, default: int, lo: int, hi: int) -> None:
    assert getattr(parse.validate({}, environ={}), key) == default
    assert getattr(parse.validate({key: lo}, environ={}), key) == lo
    assert getattr(parse.validate({key: hi}, environ={}), key) == hi
    assert not validates(key, lo - 1)
    assert not validates(key, hi + 1)


@pytest.mark.parametrize(("key", "default", "lo", "hi"), INT_RANGES)
def test_out_of_range_message_names_key_value_range_and_line(
    tmp_path: Path, key: str, default: int, lo: int, hi: int
) -> None:
    (error,) = errors_of(tmp_path, f"# a comment\n\n{key}: {hi + 1}\n")
    assert error.key == key
    assert error.line == 3
    text = str(error)
    assert text.startswith(f"line 3: {key}: ")
    assert str(hi + 1) in text
    assert f"from {lo} to {hi}" in text


def test_wrong_type_message_names_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, "sync_interval_hours: often\n")
    assert str(error) == (
        "line 1: sync_interval_hours: 'often' is not allowed (allowed: an integer from 1 to 24)"
    )


@pytest.mark.parametrize("value", ["true", "false", "yes"])
def test_a_boolean_is_not_an_integer(tmp_path: Path, value: str) -> None:
    (error,) = errors_of(tmp_path, f"max_concurrent_builds: {value}\n")
    assert error.key == "max_concurrent_builds"
    assert "is not allowed" in error.message
    assert not validates("max_concurrent_builds", True)


def test_a_fraction_is_not_an_integer(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, "max_concurrent_builds: 4.5\n")
    assert str(error) == (
        "line 1: max_concurrent_builds: 4.5 is not allowed (allowed: an integer from 1 to 20)"
    )


def test_auto_sync_projects_takes_only_booleans(tmp_path: Path) -> None:
    assert load(tmp_path, "auto_sync_projects: false\n").auto_sync_projects is False
    (error,) = errors_of(tmp_path, "auto_sync_projects: 1\n")
    assert error.key == "auto_sync_projects"
    assert "true or false" in error.message
    assert not validates("auto_sync_projects", "true")


def test_a_huge_integer_is_out_of_range_not_a_crash(tmp_path: Path) -> None:
    big = "1" + "0" * 400  # float() of it overflows
    errors = errors_of(tmp_path, f"max_concurrent_builds: {big}\nmin_free_disk_gb: -{big}\n")
    assert [(e.key, e.line) for e in errors] == [
        ("max_concurrent_builds", 1),
        ("min_free_disk_gb", 2),
    ]
    assert all("out of range" in e.message for e in errors)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_rejected(tmp_path: Path, value: str) -> None:
    (error,) = errors_of(tmp_path, f"min_free_disk_gb: {value}\n")
    assert error.key == "min_free_disk_gb"
    assert error.line == 1


def test_float_settings_take_integers_and_fractions(tmp_path: Path) -> None:
    s = load(tmp_path, "min_free_disk_gb: 2\nmax_load_per_cpu: 1.5\n")
    assert s.min_free_disk_gb == 2.0
    assert isinstance(s.min_free_disk_gb, float)
    assert s.max_load_per_cpu == 1.5


@given(st.integers())
def test_max_concurrent_builds_is_valid_iff_between_1_and_20(n: int) -> None:
    assert validates("max_concurrent_builds", n) == (1 <= n <= 20)


# -- every problem at once ---------------------------------------------------------------


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    errors = errors_of(
        tmp_path,
        "max_concurrent_builds: 0\n"
        "namespace: reqpm\n"
        "cleanup_builds_after_days: 400\n"
        "sync_intervall_hours: 3\n"
        "auto_sync_projects: maybe\n",
    )
    assert [(e.key, e.line) for e in errors] == [
        ("max_concurrent_builds", 1),
        ("cleanup_builds_after_days", 3),
        ("sync_intervall_hours", 4),
        ("auto_sync_projects", 5),
    ]


def test_the_exception_message_lists_every_error_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "max_concurrent_builds: 99\nsync_interval_hours: 0\n")
    with pytest.raises(SettingsInvalid) as info:
        parse.load(path, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "line 1: max_concurrent_builds: 99" in message
    assert "line 2: sync_interval_hours: 0" in message
    assert info.value.source == str(path)


def test_an_unknown_key_suggests_the_closest_one(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, "\nmax_concurent_builds: 4\n")
    assert error.key == "max_concurent_builds"
    assert error.line == 2
    assert "unknown setting" in error.message
    assert "did you mean 'max_concurrent_builds'?" in error.message


def test_an_unknown_key_with_nothing_close_has_no_suggestion(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, "zzzzzz: 1\n")
    assert error.message == "unknown setting"


# -- MAX_CONCURRENT_BUILDS from the environment ----------------------------------------


def test_env_supplies_max_concurrent_builds_when_the_file_lacks_it(tmp_path: Path) -> None:
    s = load(tmp_path, "namespace: x\n", environ={"MAX_CONCURRENT_BUILDS": "9"})
    assert s.max_concurrent_builds == 9


def test_the_file_wins_over_the_env(tmp_path: Path) -> None:
    s = load(tmp_path, "max_concurrent_builds: 3\n", environ={"MAX_CONCURRENT_BUILDS": "9"})
    assert s.max_concurrent_builds == 3


def test_the_file_wins_even_when_the_env_value_is_bad(tmp_path: Path) -> None:
    s = load(tmp_path, "max_concurrent_builds: 3\n", environ={"MAX_CONCURRENT_BUILDS": "lots"})
    assert s.max_concurrent_builds == 3


@pytest.mark.parametrize("value", ["0", "21", "lots", "4.5", "true", ""])
def test_a_bad_env_value_is_an_error_naming_the_variable(tmp_path: Path, value: str) -> None:
    (error,) = errors_of(tmp_path, "", environ={"MAX_CONCURRENT_BUILDS": value})
    assert error.key == "max_concurrent_builds"
    assert "MAX_CONCURRENT_BUILDS" in str(error)


def test_load_reads_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAX_CONCURRENT_BUILDS", "11")
    assert parse.load(write(tmp_path, "")).max_concurrent_builds == 11


# -- paths -------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "reqpm"
    conf_dir.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = conf_dir / "reqpmd.yaml"
    path.write_text(
        "state_dir: state\nsocket_path: ../../run/reqpmd.sock\n"
        "mock_command: ./bin/mock\nmock_root_dir: /abs/mock\n"
    )
    s = parse.load(path, environ={})
    assert s.state_dir == conf_dir / "state"
    assert s.socket_path == tmp_path / "run" / "reqpmd.sock"
    assert s.mock_command == conf_dir / "bin" / "mock"
    assert s.mock_root_dir == Path("/abs/mock")


def test_a_symlinked_path_is_kept_not_resolved(tmp_path: Path) -> None:
    # mock is often a symlink (to consolehelper) that acts on the name it was run by
    (tmp_path / "real").write_text("")
    (tmp_path / "mock").symlink_to(tmp_path / "real")
    s = load(tmp_path, f"mock_command: {tmp_path / 'mock'}\n")
    assert s.mock_command == tmp_path / "mock"
    assert load(tmp_path, "mock_command: mock\n").mock_command == tmp_path / "mock"


def test_an_empty_path_is_rejected(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, "state_dir: ''\n")
    assert error.key == "state_dir"


# -- strings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["embedded", "redis://redis.example:6379/0", "rediss://:pw@r.example:6380/1", "unix:///s.sock"],
)
def test_redis_url_accepts_embedded_and_redis_urls(url: str) -> None:
    assert parse.validate({"redis_url": url}, environ={}).as_dict()["redis_url"] == url


@pytest.mark.parametrize(
    "url", ["http://redis:6379", "redis://", "localhost:6379", "Embedded", "embedded ", "", 6379]
)
def test_redis_url_rejects_anything_else(url: Any) -> None:
    with pytest.raises(SettingsInvalid) as info:
        parse.validate({"redis_url": url}, {"redis_url": 5}, environ={})
    (error,) = info.value.errors
    assert error.key == "redis_url"
    assert error.line == 5
    assert "redis://, rediss:// or unix://" in error.message


@pytest.mark.parametrize("name", ["has space", "x" * 65, "a/b", "", "ünï"])
def test_namespace_rejects_bad_names(name: str) -> None:
    assert not validates("namespace", name)


def test_namespace_and_host_id_accept_good_names() -> None:
    values = vars(parse.validate({"namespace": "farm-1.a_b", "host_id": "x" * 64}, environ={}))
    assert (values["namespace"], values["host_id"]) == ("farm-1.a_b", "x" * 64)


# -- broken files ------------------------------------------------------------------------


def test_invalid_yaml_is_an_error_with_its_line(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, "namespace: reqpm\nmax_concurrent_builds: [4\nhost_id: x\n")
    assert error.key == "(file)"
    assert "not valid YAML" in error.message
    assert error.line is not None and error.line >= 2
    assert str(error).startswith(f"line {error.line}: (file): not valid YAML")


def test_bad_indentation_is_an_error_with_its_line(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, "namespace: reqpm\n  host_id: x\nsocket_group: g\n")
    assert "not valid YAML" in error.message
    assert error.line == 2


@pytest.mark.parametrize(
    ("text", "line"), [("- a\n- b\n", 1), ("# header\n\njust a string\n", 3), ("42\n", 1)]
)
def test_a_file_that_is_not_a_mapping_is_an_error_with_a_line(
    tmp_path: Path, text: str, line: int
) -> None:
    (error,) = errors_of(tmp_path, text)
    assert error.key == "(file)"
    assert "must be a mapping of key: value" in error.message
    assert error.line == line


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsInvalid) as info:
        parse.load(tmp_path / "absent.yaml", environ={})
    (error,) = info.value.errors
    assert error.key == "(file)"
    assert "cannot read" in error.message
    assert "No such file" in error.message
    assert info.value.source == str(tmp_path / "absent.yaml")


def test_a_file_that_is_not_utf8_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "reqpmd.yaml"
    path.write_bytes(b"namespace: reqpm\nhost_id: \xff\xfe\n")
    with pytest.raises(SettingsInvalid) as info:
        parse.load(path, environ={})
    (error,) = info.value.errors
    assert "not UTF-8" in error.message
    assert error.line == 2


# -- the shipped files -------------------------------------------------------------------


def test_the_shipped_config_loads_to_the_defaults() -> None:
    s = parse.load(SHIPPED, environ={})
    assert s.as_dict() == {
        k: str(v) if isinstance(v, Path) else v
        for k, v in parse.validate({}, environ={}).as_dict().items()
    }


def test_the_shipped_config_documents_every_setting() -> None:
    text = SHIPPED.read_text()
    for field in schema.FIELDS:
        assert re.search(rf"^#{field.name}: ", text, re.M), field.name
        assert re.search(rf"^# {field.name}: ", text, re.M), field.name


def test_the_dev_config_keeps_its_paths_next_to_where_it_is_copied(tmp_path: Path) -> None:
    # `./dev run` runs on a copy in .dev/; its relative paths follow the copy
    copy = tmp_path / ".dev" / "reqpmd.yaml"
    copy.parent.mkdir()
    copy.write_text(DEV.read_text())
    raw, _ = parse.parse_text(DEV.read_text())
    s = parse.load(copy, environ={})
    path_keys = [k for k in raw if schema.BY_NAME[k].kind is Path]
    assert "state_dir" in path_keys
    for key in path_keys:
        expected = Path(os.path.normpath(copy.parent / raw[key]))
        assert getattr(s, key) == expected, key
    assert s.max_concurrent_builds == raw["max_concurrent_builds"]


def test_parse_assignment_types_values_like_yaml() -> None:
    assert parse.parse_assignment("max_concurrent_builds=6") == ("max_concurrent_builds", 6)
    assert parse.parse_assignment(" auto_sync_projects = false") == (
        "auto_sync_projects",
        False,
    )
    assert parse.parse_assignment("redis_url=redis://h:6379/0") == (
        "redis_url",
        "redis://h:6379/0",
    )
    with pytest.raises(SettingsInvalid):
        parse.parse_assignment("max_concurrent_builds")


# -- reqpmd --check-config ---------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAX_CONCURRENT_BUILDS"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "reqpmd.daemon", "--check-config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("path", [SHIPPED, DEV], ids=["reqpmd.yaml", "dev.yaml"])
def test_check_config_accepts_the_shipped_configs(path: Path) -> None:
    result = check_config(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK"


def test_check_config_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# broken\nmax_concurrent_builds: 50\nnamespace: reqpm\nsync_interval_hours: x\n",
    )
    result = check_config(path)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"{path}: line 2: max_concurrent_builds: 50 is out of range")
    assert lines[1].startswith(f"{path}: line 4: sync_interval_hours: 'x' is not allowed")


def test_check_config_reports_a_missing_file(tmp_path: Path) -> None:
    result = check_config(tmp_path / "absent.yaml")
    assert result.returncode != 0
    assert "cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_reports_invalid_yaml_without_a_traceback(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, "a: [1\n"))
    assert result.returncode != 0
    assert "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unset_path_setting_is_shown_empty_not_as_a_dot() -> None:
    s = parse.validate({}, environ={})
    assert s.as_dict()["redis_password_file"] == ""
    assert schema.shown_setting("redis_tls_ca_file", s.redis_tls_ca_file) == ""
