"""Settings: defaults < VOICEGATE_* environment < explicit overrides, validated."""

from pathlib import Path

import pytest

from server.config import Settings
from server.errors import ConfigError


def test_defaults_are_valid() -> None:
    settings = Settings.load(environ={})
    assert settings.port == 50051
    assert settings.embedded_triton
    assert settings.encoder_model == "ge2e_int8"


def test_environment_overrides_defaults_and_flags_override_environment() -> None:
    environ = {"VOICEGATE_PORT": "6000", "VOICEGATE_TRITON_URL": "triton:8001"}
    assert Settings.load(environ=environ).port == 6000
    settings = Settings.load({"port": 7000, "triton_url": None}, environ=environ)
    assert settings.port == 7000
    assert settings.triton_url == "triton:8001"
    assert not settings.embedded_triton


def test_types_are_parsed_from_text() -> None:
    environ = {
        "VOICEGATE_GRACE_SECONDS": "2.5",
        "VOICEGATE_ENCODER_MODELS": "ge2e_int8, ge2e_fp32 ,",
        "VOICEGATE_DATA_DIR": "/tmp/speech",
        "VOICEGATE_CALIBRATION_FILE": "none",
    }
    settings = Settings.load(environ=environ)
    assert settings.grace_seconds == 2.5
    assert settings.encoder_models == ("ge2e_int8", "ge2e_fp32")
    assert settings.data_dir == Path("/tmp/speech")
    assert settings.calibration_file is None


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"VOICEGATE_PORT": "70000"}, "port"),
        ({"VOICEGATE_PORT": "abc"}, "VOICEGATE_PORT"),
        ({"VOICEGATE_TRITON_URL": "no-port"}, "HOST:PORT"),
        ({"VOICEGATE_ENCODER_MODEL": "other"}, "encoder_models"),
        ({"VOICEGATE_LOG_LEVEL": "LOUD"}, "log_level"),
        ({"VOICEGATE_PREPROCESS_WORKERS": "0"}, "preprocess_workers"),
    ],
)
def test_invalid_values_name_the_setting(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Settings.load(environ=environ)


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.load({"colour": "blue"}, environ={})
