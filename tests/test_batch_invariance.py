"""An utterance's embedding must not depend on which other requests shared its batch.

Behind Triton's dynamic batcher, one ONNX Runtime run holds the partials of every request
that arrived together; with dynamic int8 quantization (scales from the whole batch) the same
recording got a different embedding, and possibly a different Verify decision, from one call
to the next. The served encoders must give the same embedding alone or under load (1e-5).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import evaluation, validation
from tests import tritonkit
from tests.conftest import MODEL_REPOSITORY, dev_data_dir, require_exported_models

LIMIT = 1e-5
OTHER_CLIENTS = 24


def _session(model: Path, threads: int = 1) -> Any:
    from export.onnx_export import session

    return session(model, threads)


def _partials(n: int) -> np.ndarray:
    """Real mel partials when the dev speech is there (else power-mel-like noise)."""
    data = dev_data_dir()
    if data is None:
        return validation.random_partials(n, seed=21)
    from export.devdata import load_dev_set

    return load_dev_set(data, 4).all_partials[:n]


@pytest.fixture(scope="module")
def served_models() -> dict[str, Path]:
    require_exported_models()
    return {
        name: MODEL_REPOSITORY / name / "1" / "model.onnx" for name in ("ge2e_int8", "ge2e_fp32")
    }


# --- the exported models, in process ------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["ge2e_int8", "ge2e_fp32"])
def test_served_model_gives_each_partial_the_same_embedding_in_any_batch(
    served_models: dict[str, Path], name: str, threads: int
) -> None:
    from export.onnx_export import run

    sess = _session(served_models[name], threads)
    figures = evaluation.batch_invariance(
        lambda mels: run(sess, mels),
        _partials(12),
        validation.random_partials(52, seed=threads),  # batch-mates loud and quiet
        batch_sizes=(2, 5, 33, 64),
        seed=threads,
    )
    assert figures["max_abs_diff"] <= LIMIT


def test_dynamic_int8_depends_on_its_batch(served_models: dict[str, Path], tmp_path: Path) -> None:
    """The check above catches the old model: ONNX Runtime's dynamic int8 (scales over the
    whole batch) moves an embedding by far more than 1e-5 when its batch-mates change."""
    from export.onnx_export import run
    from export.quantize import quantize_int8

    dynamic = tmp_path / "dynamic_int8.onnx"
    quantize_int8(served_models["ge2e_fp32"], dynamic)
    sess = _session(dynamic)
    figures = evaluation.batch_invariance(
        lambda mels: run(sess, mels), _partials(6), validation.random_partials(26, seed=3)
    )
    assert figures["max_abs_diff"] > 100 * LIMIT


# --- through the running server -----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("model", ["ge2e_int8", "ge2e_fp32"])
async def test_same_utterance_same_embedding_alone_and_under_concurrent_load(
    speaker_stub: Any, triton: Any, speech_files: list[Path], model: str
) -> None:
    """The same recording embedded alone, then again while other clients' Embed calls are in
    flight (so Triton batches it with theirs, in different company each round): every
    embedding equal within 1e-5, and Triton's statistics show that requests were merged."""
    from server.api.voicegate.v1 import speaker_pb2
    from tests import speech

    target = speech.content(*speech.read(speech_files[0]))
    others = [speech.content(*speech.read(p)) for p in speech_files[1 : 1 + OTHER_CLIENTS]]

    async def embed(audio: Any) -> np.ndarray:
        reply = await speaker_stub.Embed(speaker_pb2.EmbedRequest(audio=audio, model=model))
        assert reply.model == model
        return np.asarray(reply.embedding, dtype=np.float32)

    alone = await embed(target)
    np.testing.assert_array_equal(await embed(target), alone)
    before = await tritonkit.model_counts(triton.grpc_url, model)
    worst = 0.0
    for round_index in range(3):
        rng = np.random.default_rng(round_index)
        company = [others[i] for i in rng.permutation(len(others))[: 8 + 8 * round_index]]
        position = int(rng.integers(0, len(company) + 1))
        calls = [*company[:position], target, *company[position:], target]
        replies = await asyncio.gather(*(embed(audio) for audio in calls))
        for index in (position, len(calls) - 1):  # the target's replies
            worst = max(worst, float(np.abs(replies[index] - alone).max()))
    after = await tritonkit.model_counts(triton.grpc_url, model)
    merged = (after.requests - before.requests, after.executions - before.executions)
    print(f"{model}: max |alone - under load| = {worst:.3g}; requests, executions: {merged}")
    assert worst <= LIMIT, f"{model}: embedding moved by {worst:.3g} under load"
    # the load did batch: fewer model executions than requests
    assert merged[1] < merged[0]
