"""Score fusion for Verify: GE2E cosine and MFCC score → one calibrated score and a decision.

`fused = sigmoid(ge2e_weight * ge2e + mfcc_weight * mfcc + bias)`, a same-speaker probability
under equal priors as fitted by `server.calibration`; `decide` accepts `fused >= threshold`.
The parameters live in a JSON file, fitted for one silence trim (`voicegate calibrate --trim`);
the packaged defaults are `server/calibration.json` (trim "vad") and
`server/calibration-energy.json` (trim "energy").
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from server.errors import ConfigError
from server.mfcc import MfccNormalization

# The packaged calibration of each silence trim: the scores' distributions depend on it.
PACKAGED_FILES = {"vad": "calibration.json", "energy": "calibration-energy.json"}
TRIMS = tuple(PACKAGED_FILES)
FORMAT_VERSION = 1


class CalibrationFileError(ConfigError):
    """A calibration file is missing, unreadable or has invalid content."""


@dataclass(frozen=True)
class Calibration:
    """Fusion weights, decision threshold and the MFCC normalisation, with their provenance."""

    ge2e_weight: float
    mfcc_weight: float
    bias: float
    threshold: float
    mfcc_mean: list[float]
    mfcc_std: list[float]
    method: str
    trained_on: str
    figures: dict[str, Any] = field(default_factory=dict)
    trim: str = "energy"  # the silence trim it was fitted with (files before it: energy)

    def __post_init__(self) -> None:
        for name in ("ge2e_weight", "mfcc_weight", "bias", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CalibrationFileError(f"calibration {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise CalibrationFileError(f"calibration {name} must be finite, got {value!r}")
        if not 0.0 < self.threshold < 1.0:
            raise CalibrationFileError(
                f"calibration threshold must lie strictly between 0 and 1 (it applies to a "
                f"sigmoid), got {self.threshold}"
            )
        for name in ("mfcc_mean", "mfcc_std"):
            values = getattr(self, name)
            if not isinstance(values, list | tuple) or not values:
                raise CalibrationFileError(f"calibration {name} must be a non-empty list")
            for value in values:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                ):
                    raise CalibrationFileError(
                        f"calibration {name} must hold finite numbers, found {value!r}"
                    )
        if len(self.mfcc_mean) != len(self.mfcc_std):
            raise CalibrationFileError(
                f"calibration mfcc_mean has {len(self.mfcc_mean)} values but mfcc_std has "
                f"{len(self.mfcc_std)}"
            )
        if any(value <= 0 for value in self.mfcc_std):
            raise CalibrationFileError("calibration mfcc_std values must all be > 0")
        for name in ("method", "trained_on"):
            if not isinstance(getattr(self, name), str):
                raise CalibrationFileError(f"calibration {name} must be a string")
        if not isinstance(self.figures, dict):
            raise CalibrationFileError("calibration figures must be an object")
        if self.trim not in TRIMS:
            raise CalibrationFileError(
                f"calibration trim must be one of {list(TRIMS)}, got {self.trim!r}"
            )

    @cached_property
    def mfcc_normalization(self) -> MfccNormalization:
        """(mean, std) for `server.mfcc.mfcc_score` and `standardised_units`, as arrays made
        once."""
        return MfccNormalization(self.mfcc_mean, self.mfcc_std)

    def fuse(self, ge2e_score: float, mfcc_score: float) -> float:
        """The fused score in [0, 1], increasing in both scores when both weights are > 0."""
        z = self.ge2e_weight * float(ge2e_score) + self.mfcc_weight * float(mfcc_score)
        return _sigmoid(z + self.bias)

    def decide(self, fused: float) -> bool:
        """True (same speaker) when the fused score reaches the threshold."""
        return float(fused) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mfcc_mean"] = [float(v) for v in self.mfcc_mean]
        data["mfcc_std"] = [float(v) for v in self.mfcc_std]
        return {"format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_dict(cls, data: Any, source: str = "calibration") -> Calibration:
        """Build and validate from parsed JSON; errors name `source` and the problem."""
        if not isinstance(data, dict):
            raise CalibrationFileError(f"{source}: expected a JSON object at the top level")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise CalibrationFileError(
                f"{source}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
            )
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.name not in ("figures", "trim")]
        missing = [name for name in required if name not in data]
        if missing:
            raise CalibrationFileError(f"{source}: missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(names) - {"format_version"})
        if unknown:
            raise CalibrationFileError(f"{source}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**{name: data[name] for name in names if name in data})
        except CalibrationFileError as exc:
            raise CalibrationFileError(f"{source}: {exc.message}") from None

    @classmethod
    def load(cls, path: Path | None = None, trim: str = "vad") -> Calibration:
        """Read a calibration file; None reads the packaged one fitted with `trim`
        (`server/calibration.json` for "vad", `server/calibration-energy.json`)."""
        if path is None:
            packaged = PACKAGED_FILES[trim]
            source = f"packaged server/{packaged}"
            try:
                text = resources.files("server").joinpath(packaged).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CalibrationFileError(f"{source} cannot be read: {exc}") from None
        else:
            source = str(path)
            try:
                text = Path(path).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CalibrationFileError(
                    f"calibration file {source} cannot be read: {exc}"
                ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationFileError(f"{source} is not valid JSON: {exc}") from None
        return cls.from_dict(data, source)

    def save(self, path: Path) -> None:
        """Write as JSON, atomically (a temporary file renamed over the target)."""
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)
