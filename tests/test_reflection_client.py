"""Server reflection, proven with a reflection client the project did not write (grpc_requests).

The client gets a fresh descriptor pool, so it cannot see the stubs this test process has
imported: it learns SpeakerService, its messages and their imports from the server alone, and
builds requests from plain dictionaries (protobuf JSON mapping: bytes as base64). Its
synchronous client runs in a worker thread because the server shares this test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from grpc_requests import ReflectionClient

pytestmark = pytest.mark.integration

SERVICE = "voicegate.v1.SpeakerService"
HEALTH = "grpc.health.v1.Health"


@pytest.fixture(scope="module")
def endpoint(app: Any) -> str:
    return f"127.0.0.1:{app.port}"


def reflection_client(endpoint: str) -> ReflectionClient:
    # Not get_by_endpoint: that caches clients per process and shares the default pool.
    return ReflectionClient(endpoint, descriptor_pool=descriptor_pool.DescriptorPool())


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def discover_and_embed(endpoint: str, path: Path) -> dict[str, Any]:
    client = reflection_client(endpoint)
    pool = client._desc_pool  # the fresh pool: empty until reflection filled it
    assert client.service_names is not None
    found = {
        "services": set(client.service_names),
        "methods": set(client.service(SERVICE).method_names),
        "request_fields": {
            f.name for f in client.get_method_descriptor(SERVICE, "Embed").input_type.fields
        },
        "description": client.describe_request(SERVICE, "Embed"),
        "files": {pool.FindFileContainingSymbol(SERVICE).name},
    }
    found["embed"] = client.request(SERVICE, "Embed", {"audio": {"content": b64(path)}})
    found["health"] = client.request(HEALTH, "Check", {"service": SERVICE})
    return found


def verify(endpoint: str, reference: Path, probe: Path) -> dict[str, Any]:
    client = reflection_client(endpoint)
    request = {"reference": {"content": b64(reference)}, "probe": {"content": b64(probe)}}
    reply: dict[str, Any] = client.request(SERVICE, "Verify", request)
    return reply


def embed_nothing(endpoint: str) -> None:
    reflection_client(endpoint).request(SERVICE, "Embed", {})


async def test_reflection_client_discovers_and_calls_embed(
    endpoint: str, speech_files: list[Path]
) -> None:
    found = await asyncio.to_thread(discover_and_embed, endpoint, speech_files[0])

    assert {SERVICE, HEALTH, "grpc.reflection.v1alpha.ServerReflection"} <= found["services"]
    assert {"Embed", "Verify"} <= found["methods"]
    assert found["request_fields"] == {"audio", "model"}
    assert "audio: MESSAGE" in found["description"]
    assert found["files"] == {"voicegate/v1/speaker.proto"}
    assert found["health"] == {"status": "SERVING"}

    reply = found["embed"]  # MessageToDict with proto field names
    vector = np.asarray(reply["embedding"], dtype=np.float32)
    assert vector.shape == (256,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    assert reply["model"] == "ge2e_int8"
    assert reply["speech_seconds"] > 1.0
    assert reply["partial_count"] >= 1


async def test_reflection_client_calls_verify(endpoint: str, speech_files: list[Path]) -> None:
    reply = await asyncio.to_thread(verify, endpoint, speech_files[0], speech_files[1])
    assert reply.get("same_speaker", False) is False  # proto3 JSON omits a false bool
    assert 0.0 <= reply["score"] <= 1.0
    assert {s["model"] for s in reply["scores"]} == {"ge2e", "mfcc"}


async def test_reflection_client_sees_status_codes(endpoint: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await asyncio.to_thread(embed_nothing, endpoint)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audio is required" in caught.value.details()
