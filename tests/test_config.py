import os
import subprocess
import sys
import tomllib

import pytest

from kvstore.config import ServerConfig, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 << 30),
        ("512MiB", 512 << 20),
        ("64k", 64 << 10),
        ("1048576", 1 << 20),
        ("1.5G", 3 << 29),
        ("2 MB", 2 << 20),
        ("7b", 7),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected
    assert parse_size(format_size(expected)) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1", "4 GiBs", "x1"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_flags_win_over_environment_over_defaults() -> None:
    env = {"KVSTORE_HOST_CAPACITY": "64MiB", "KVSTORE_CHUNK_SIZE": "2MiB"}
    config = ServerConfig.resolve({"host_capacity": "32MiB", "chunk_size": None}, env)
    assert config.host_capacity == 32 << 20
    assert config.chunk_size == 2 << 20
    assert config.workers == ServerConfig().workers


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        ({"address": "localhost"}, "address"),
        ({"address": "127.0.0.1:99999"}, "address"),
        ({"host_capacity": "1k"}, "host_capacity"),
        ({"host_capacity": "lots"}, "host_capacity"),
        ({"chunk_size": "1"}, "chunk_size"),
        ({"workers": "1"}, "workers"),
        ({"log_level": "loud"}, "log_level"),
        ({"fsync": "sometimes"}, "fsync"),
        ({"dirty_ratio": "1.5"}, "dirty_ratio"),
        ({"segment_size": "4k"}, "segment_size"),
        ({"persist_on_shutdown": "maybe"}, "persist_on_shutdown"),
        ({"device_capacity": "a lot"}, "device_capacity"),
    ],
)
def test_invalid_settings_name_the_field(flags: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}"):
        ServerConfig.resolve(flags, {})


def test_environment_errors_name_the_variable() -> None:
    with pytest.raises(ValueError, match="KVSTORE_HOST_CAPACITY"):
        ServerConfig.resolve({}, {"KVSTORE_HOST_CAPACITY": "big"})


def print_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvstore.server", "--print-config", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_a_config_file_sits_under_the_environment_and_the_flags(tmp_path) -> None:
    path = tmp_path / "kvstore.toml"
    path.write_text(
        'host-capacity = "64MiB"\nchunk_size = "2MiB"\nworkers = 12\nprefault = false\n'
    )
    shown = print_config(
        "--config", str(path), "--host-capacity", "32MiB", env={"KVSTORE_CHUNK_SIZE": "4MiB"}
    )
    assert shown.returncode == 0, shown.stderr
    settings = tomllib.loads(shown.stdout)  # what it prints is a config file itself
    assert settings["host-capacity"] == "32MiB"  # flag over file
    assert settings["chunk-size"] == "4MiB"  # environment over file
    assert (settings["workers"], settings["prefault"]) == (12, False)  # file over default
    assert settings["ticket-ttl"] == ServerConfig().ticket_ttl  # default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("host_capacty = '1GiB'\n", "host_capacty (from"),
        ("workers = 'many'\n", "workers (from the config file)"),
        ("fsync = 'sometimes'\n", "fsync: expected one of"),
        ("this is not toml\n", "is not TOML"),
    ],
)
def test_a_bad_config_file_is_an_error_naming_the_key(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "kvstore.toml"
    path.write_text(text)
    shown = print_config("--config", str(path))
    assert shown.returncode != 0
    assert message in shown.stderr
