"""Real speech for the export's checks: mel partials of the development utterances."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.audio import load_file
from server.features import prepare_utterance

# ../shared/data beside the project (parents[1] is the project root, parents[2] its folder).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data/librispeech-train-clean-100"
AUDIO_SUFFIXES = (".flac", ".wav")


@dataclass(frozen=True)
class DevSet:
    """Mel partials of each utterance, in file-name order (so every export sees the same)."""

    data_dir: Path
    files: tuple[str, ...]
    partials: tuple[np.ndarray, ...]  # one [n, 160, 40] array per utterance

    @property
    def n_partials(self) -> int:
        return sum(len(p) for p in self.partials)

    @property
    def all_partials(self) -> np.ndarray:
        return np.concatenate(self.partials)


def resolve_data_dir(data_dir: Path | None) -> Path | None:
    """`data_dir`, else `VOICEGATE_DATA_DIR`, else the shared LibriSpeech folder, if it exists."""
    if data_dir is None:
        env = os.environ.get("VOICEGATE_DATA_DIR")
        data_dir = Path(env) if env else DEFAULT_DATA_DIR
    return data_dir if data_dir.is_dir() else None


def audio_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)


def load_dev_set(data_dir: Path, n_utterances: int) -> DevSet:
    """The first `n_utterances` audio files of `data_dir`, decoded, trimmed and cut to partials."""
    files = audio_files(data_dir)[:n_utterances]
    partials = [prepare_utterance(load_file(str(path))).partials for path in files]
    return DevSet(data_dir, tuple(p.name for p in files), tuple(partials))
