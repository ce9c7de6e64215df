"""A/B of server settings: end-to-end Embed throughput of several configurations in one run.

Every variant is its own `voicegate serve` process (all started up front, idle while another is
measured), with a temporary copy of the model repository whose `config.pbtxt` files are changed
as asked, and/or extra environment. Rounds visit the variants in rotating order; each figure is
a same-round ratio to the first variant (the baseline), then the median over rounds and its
spread. The clips and the measurement are those of `benchmarks.throughput` (part a).

    .venv/bin/python -m benchmarks.sweep --variant base --variant inst2:instances=2 \\
        --variant workers1:VOICEGATE_PREPROCESS_WORKERS=1 --levels 8 --rounds 3

Variant syntax `NAME[:KEY=VALUE,...]`; keys: `instances` (instance_group count), `delay`
(max_queue_delay_microseconds), `intra` (intra_op_thread_count), `max_batch` (max_batch_size);
any upper-case KEY is an environment variable for that server (e.g. VOICEGATE_PREPROCESS_WORKERS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MODEL_REPOSITORY,
    ServeProcess,
    accepted_clips,
    add_data_dir_argument,
    log,
    make_clips,
    median_and_spread,
    require_data_dir,
    rotating_rounds,
)
from benchmarks.throughput import e2e_step

CONFIG_KEYS = ("instances", "delay", "intra", "max_batch")


@dataclass
class Variant:
    name: str
    config: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, _, spec = text.partition(":")
        variant = cls(name=name)
        for item in filter(None, spec.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r} is not KEY=VALUE")
            if key in CONFIG_KEYS:
                variant.config[key] = int(value)
            elif key.isupper():
                variant.env[key] = value
            else:
                raise ValueError(f"unknown key {key!r}: use {CONFIG_KEYS} or an ENV_VARIABLE")
        return variant


def repository_copy(source: Path, target: Path, changes: dict[str, int]) -> Path:
    """`source` copied to `target` with each model's config.pbtxt changed (parsed, not regexed)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for path in sorted(target.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        if "instances" in changes:
            config.instance_group[0].count = changes["instances"]
        if "delay" in changes:
            config.dynamic_batching.max_queue_delay_microseconds = changes["delay"]
        if "intra" in changes:
            config.parameters["intra_op_thread_count"].string_value = str(changes["intra"])
        if "max_batch" in changes:
            config.max_batch_size = changes["max_batch"]
        path.write_text(text_format.MessageToString(config))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, help="NAME[:KEY=VALUE,...]")
    add_data_dir_argument(parser)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--levels", type=int, nargs="+", default=[8])
    parser.add_argument(
        "--quiet-wait", type=float, default=10.0, help="max wait for a lull before each run"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data_dir = require_data_dir(parser, args.data_dir)
    try:
        variants = [Variant.parse(text) for text in args.variant]
    except ValueError as exc:
        parser.error(str(exc))

    clips = make_clips(data_dir, args.clips, 1.0, 4.0)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="voicegate-sweep-") as tmp:
        servers = {}
        for variant in variants:
            repository = None
            if variant.config:
                repository = repository_copy(
                    MODEL_REPOSITORY, Path(tmp) / variant.name, variant.config
                )
            log(f"starting {variant.name}: config {variant.config}, env {variant.env}")
            servers[variant.name] = stack.enter_context(ServeProcess(repository, variant.env))
        first = next(iter(servers.values()))
        clips = asyncio.run(accepted_clips(first.target, clips))
        rounds = rotating_rounds(
            servers,
            args.levels,
            args.rounds,
            lambda server, level: e2e_step(
                server.target, clips, level, server.pids(), server.triton_url()
            ),
            args.quiet_wait,
        )

    base = variants[0].name
    print(f"\n{len(clips)} clips, {args.rounds} rounds; ratio = same-round utt/s / {base}'s")
    print(
        f"{'variant':24s} {'utt/s':>6s} {'ratio':>6s} {'spread':>7s} {'p50':>6s} {'p99':>6s} "
        f"{'batch':>6s} {'others':>6s}  CPU ms/utt (front python, stub, tritonserver)"
    )
    summary: dict[str, Any] = {}
    for level in args.levels:
        for variant in variants:
            key = f"{variant.name} c={level}"
            rates = [r[key]["utt_per_s"] for r in rounds]
            ratio = median_and_spread(
                [r[key]["utt_per_s"] / r[f"{base} c={level}"]["utt_per_s"] for r in rounds]
            )
            med = {
                name: statistics.median(r[key][name] for r in rounds)
                for name in ("p50_ms", "p99_ms")
            }
            cpu = {
                name: statistics.median(r[key]["cpu_ms_per_utt"].get(name, 0.0) for r in rounds)
                for name in ("python", "triton_python_b", "tritonserver")
            }
            batch = statistics.median(r[key]["triton"].get("batch_partials", 0.0) for r in rounds)
            others = statistics.median(r[key]["others_cores"] for r in rounds)
            summary[key] = {
                "utt_per_s": median_and_spread(rates),
                "ratio_to_base": ratio,
                **med,
                "batch_partials": batch,
                "others_cores": others,
                "cpu_ms_per_utt": cpu,
                "config": variant.config,
                "env": variant.env,
            }
            print(
                f"{key:24s} {statistics.median(rates):6.1f} {ratio['median']:6.2f} "
                f"{ratio['spread']:6.0%} {med['p50_ms']:6.0f} {med['p99_ms']:6.0f} "
                f"{batch:6.1f} {others:6.2f}  " + " / ".join(f"{v:.1f}" for v in cpu.values())
            )
    if args.json:
        args.json.write_text(
            json.dumps({"summary": summary, "rounds": rounds, "time": time.ctime()}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
