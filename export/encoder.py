"""The GE2E speaker encoder rebuilt in torch, with resemblyzer's pretrained weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from server.errors import ExportError

N_MELS = 40
HIDDEN = 256
EMBEDDING = 256
LAYERS = 3
# The checkpoint also holds the GE2E loss's similarity scale and bias, used only in training.
TRAINING_ONLY_KEYS = frozenset({"similarity_weight", "similarity_bias"})


class SpeakerEncoder(nn.Module):
    """LSTM(40→256, 3 layers) → Linear(256→256) → ReLU → L2 norm of the last hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
        self.linear = nn.Linear(HIDDEN, EMBEDDING)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)
        raw = self.relu(self.linear(hidden[-1]))
        return raw / torch.norm(raw, dim=1, keepdim=True)


def pretrained_path() -> Path:
    """Where the resemblyzer wheel keeps `pretrained.pt`, found without importing resemblyzer
    (its package import pulls webrtcvad and its own audio stack)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            "resemblyzer is not installed: it ships the GE2E weights "
            "(pip install --no-deps resemblyzer==0.1.4)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"
    if not path.is_file():
        raise ExportError(f"GE2E weights not found at {path}")
    return path


def load_encoder(weights: Path | None = None) -> SpeakerEncoder:
    """The encoder in eval mode with the pretrained weights; every model key must be present."""
    path = weights or pretrained_path()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = dict(checkpoint["model_state"])
    unknown = set(state) - TRAINING_ONLY_KEYS - set(SpeakerEncoder().state_dict())
    if unknown:
        raise ExportError(f"unexpected keys in {path}: {sorted(unknown)}")
    for key in TRAINING_ONLY_KEYS:
        state.pop(key, None)
    model = SpeakerEncoder()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"GE2E weights in {path} do not fit the encoder: {exc}") from None
    return model.eval()
