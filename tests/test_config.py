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
