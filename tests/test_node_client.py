"""The Node.js example client (examples/node) against the real server, on real speech.

The client runs as a subprocess under asyncio so the session's event loop, which also runs the
front server, keeps serving while it waits. Its embeddings are compared with those of the
Python stubs: the same API, seen from two languages, gives the same answer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.api.voicegate.v1 import audio_pb2, speaker_pb2

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "examples" / "node"
CLIENT = NODE_DIR / "client.js"
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def node(node_modules: Path) -> str:
    """The node binary, with the example's locked packages installed (`npm ci`)."""
    node = shutil.which("node")
    assert node is not None  # node_modules skips without it
    return node


async def run_client(node: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        node,
        str(CLIENT),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def unit(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


async def test_node_client_embeds_and_verifies_real_speech(
    app: Any, node: str, speaker_stub: Any, speech_files: list[Path]
) -> None:
    first, second = speech_files[0], speech_files[1]
    code, out, err = await run_client(
        node, "--server", f"127.0.0.1:{app.port}", "--json", str(first), str(second)
    )
    assert code == 0, err
    result = json.loads(out)

    assert [e["file"] for e in result["embeddings"]] == [str(first), str(second)]
    for entry, path in zip(result["embeddings"], (first, second), strict=True):
        vector = unit(entry["embedding"])
        assert entry["dimensions"] == vector.shape[0] == 256
        assert entry["norm"] == pytest.approx(1.0, abs=1e-4)
        assert entry["model"] == "ge2e_int8"
        assert entry["speechSeconds"] > 1.0
        assert entry["partialCount"] >= 1
        # The Python stubs on the same bytes: the same embedding.
        reference = await speaker_stub.Embed(
            speaker_pb2.EmbedRequest(audio=audio_pb2.Audio(content=path.read_bytes()))
        )
        assert float(np.dot(vector, unit(reference.embedding))) > 0.999

    verification = result["verification"]
    assert verification["sameSpeaker"] is False  # two LibriSpeech speakers
    assert 0.0 <= verification["score"] <= 1.0
    assert set(verification["scores"]) == {"ge2e", "mfcc"}
    assert (verification["score"] >= verification["threshold"]) is verification["sameSpeaker"]
    cosine = float(np.dot(*(unit(e["embedding"]) for e in result["embeddings"])))
    assert verification["scores"]["ge2e"] == pytest.approx(cosine, abs=2e-3)


async def test_node_client_text_output_and_model_choice(
    app: Any, node: str, speech_files: list[Path]
) -> None:
    code, out, err = await run_client(
        node, "--server", f"127.0.0.1:{app.port}", "--model", "ge2e_fp32", str(speech_files[2])
    )
    assert code == 0, err
    assert "256-d embedding (norm 1.0000)" in out
    assert "model ge2e_fp32" in out


async def test_node_client_reports_the_status_code(
    app: Any, node: str, tmp_path: Path, speech_files: list[Path]
) -> None:
    garbage = tmp_path / "not-audio.wav"
    garbage.write_bytes(b"\x00garbage" * 64)
    code, _, err = await run_client(node, "--server", f"127.0.0.1:{app.port}", str(garbage))
    assert code == 1
    assert "voicegate: INVALID_ARGUMENT: audio.content is not a decodable audio file" in err

    code, _, err = await run_client(
        node, "--server", f"127.0.0.1:{app.port}", "--model", "nope", str(speech_files[0])
    )
    assert code == 1
    assert "INVALID_ARGUMENT" in err and "'nope' is not served" in err
