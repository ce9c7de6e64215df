"""resemblyzer's own pipeline on the benchmark clips, in a process of its own (torch stays here).

Started by `benchmarks.throughput`. It loads the clips and the encoder once, then for each line
`THREADS` read on stdin sets `torch.set_num_threads(THREADS)`, embeds every clip once and writes
one JSON line on stdout. Per clip, timed: `soundfile.read` of the WAV bytes,
`resemblyzer.preprocess_wav` (volume normalisation, webrtcvad silence trimming) and
`VoiceEncoder.embed_utterance` (mel, 1.6 s partials, the torch LSTM, averaging).

    .venv/bin/python -m benchmarks.resemblyzer_worker CLIPS.pkl   # then write "1" or "2" lines
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("clips", type=Path, help="pickle of a list of WAV files as bytes")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)

    import soundfile
    import torch
    from resemblyzer import VoiceEncoder, preprocess_wav

    from benchmarks.common import machine_busy_seconds

    clips: list[bytes] = pickle.loads(args.clips.read_bytes())
    encoder = VoiceEncoder(device="cpu", verbose=False)

    def embed(clip: bytes) -> None:
        wav, rate = soundfile.read(io.BytesIO(clip), dtype="float32")
        encoder.embed_utterance(preprocess_wav(wav, source_sr=rate))

    print(json.dumps({"ready": True, "torch_version": torch.__version__}), flush=True)
    for line in sys.stdin:
        torch.set_num_threads(int(line))
        for clip in clips[: args.warmup]:
            embed(clip)
        latencies = []
        machine_began = machine_busy_seconds()
        cpu_began = time.process_time()
        began = time.perf_counter()
        for clip in clips:
            start = time.perf_counter()
            embed(clip)
            latencies.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - began
        result = {
            "utterances": len(clips),
            "elapsed_s": elapsed,
            "latencies_s": latencies,
            "cpu_s": time.process_time() - cpu_began,
            "machine_busy_s": machine_busy_seconds() - machine_began,
            "torch_threads": torch.get_num_threads(),
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
