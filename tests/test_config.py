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
        ({"VOICEGATE_MAX_MESSAGE_BYTES": "1000"}, "VOICEGATE_MAX_MESSAGE_BYTES"),
        ({"VOICEGATE_MAX_MESSAGE_BYTES": str(2**31)}, "32-bit"),
        ({"VOICEGATE_MAX_AUDIO_SECONDS": "0.2"}, "must exceed min_speech_seconds"),
        ({"VOICEGATE_MIN_SPEECH_SECONDS": "0"}, "min_speech_seconds"),
        ({"VOICEGATE_MIN_SAMPLE_RATE_HZ": "999"}, "min_sample_rate_hz"),
        ({"VOICEGATE_MIN_SAMPLE_RATE_HZ": "200000"}, "<= max_sample_rate_hz"),
        ({"VOICEGATE_MAX_SAMPLE_RATE_HZ": "16000", "VOICEGATE_MIN_SAMPLE_RATE_HZ": "22050"}, "min"),
        ({"VOICEGATE_MAX_SAMPLE_RATE_HZ": "1000000"}, "max_sample_rate_hz"),
        ({"VOICEGATE_MAX_CHANNELS": "0"}, "VOICEGATE_MAX_CHANNELS"),
        ({"VOICEGATE_MAX_CHANNELS": "65"}, "max_channels"),
        ({"VOICEGATE_MAX_CHANNELS": "two"}, "VOICEGATE_MAX_CHANNELS"),
    ],
)
def test_invalid_values_name_the_setting(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Settings.load(environ=environ)


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings.load({"colour": "blue"}, environ={})


def test_audio_limits_come_from_the_environment() -> None:
    environ = {
        "VOICEGATE_MAX_AUDIO_SECONDS": "30",
        "VOICEGATE_MIN_SPEECH_SECONDS": "1.5",
        "VOICEGATE_MIN_SAMPLE_RATE_HZ": "16000",
        "VOICEGATE_MAX_SAMPLE_RATE_HZ": "48000",
        "VOICEGATE_MAX_CHANNELS": "2",
        "VOICEGATE_MAX_MESSAGE_BYTES": "1048576",
    }
    settings = Settings.load(environ=environ)
    limits = settings.audio_limits
    assert (limits.max_seconds, limits.min_speech_seconds) == (30.0, 1.5)
    assert (limits.min_sample_rate_hz, limits.max_sample_rate_hz) == (16_000, 48_000)
    assert limits.max_channels == 2
    assert settings.max_message_bytes == 1_048_576
    defaults = Settings.load(environ={})
    assert (defaults.max_audio_seconds, defaults.min_speech_seconds) == (600.0, 0.5)
    assert (defaults.min_sample_rate_hz, defaults.max_sample_rate_hz) == (8_000, 192_000)
    assert (defaults.max_channels, defaults.max_message_bytes) == (8, 32 * 1024 * 1024)
