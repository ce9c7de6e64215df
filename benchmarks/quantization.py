"""Precision variants of the GE2E encoder, measured side by side on this CPU.

What is compared (all built here from the same torch weights, ONNX Runtime CPU, 1 thread):

- `fp32`: the reference (torch export).
- `dynamic int8`: the previous served model, ONNX Runtime `quantize_dynamic`, per-channel
  weights, first LSTM fp32. Its activation scales come from the min/max of the whole batch.
- `invariant int8 (GPTQ)`: the served model (export/int8_invariant.py): the same fused
  `DynamicQuantizeLSTM`, with two anchor units per layer that pin every activation range to
  the LSTM's own [h_min, h_max], and GPTQ-rounded weights (seeded dev-speech calibration).
- `invariant int8 (nearest)`: the same without calibration (weights rounded to nearest).
- `unrolled static int8`: layers 2 and 3 written out step by step (160 steps each) with
  constant, calibrated activation scales: QuantizeLinear + MatMulIntegerToFloat for X·Wᵀ (one
  matmul over all steps) and for h·Rᵀ per step, then the gates as ONNX element-wise operators;
  weights as in the GPTQ variant. First LSTM fp32 as everywhere.
- `dynamic int8, per request`: the dynamic model, but the Python backend runs each request
  on its own: invariant to other requests by construction (an utterance's partials still
  share their run). Timed with requests of 8 partials (a 6-7 s utterance); shorter
  utterances run at the batch-1 or batch-2 rate. In the invariance check each partial is a
  request of its own.

Figures per variant: ONNX size; cosine to fp32 per utterance (min, mean) over whole dev
utterances and over the EER trial halves; dev EER (export/evaluation.py: the two halves of
each held-out recording vs the other recordings' second halves); partials/s at batch 1, 8, 32
(median over interleaved rounds of partials per CPU-second of this process: with one ORT
thread that is the compute itself, and time lost to other jobs on a shared machine does not
count; wall-clock figures and the spread are in the JSON, and with more threads only the
wall-clock ratio is printed); batch invariance (max |embedding alone - embedding in batches with
other partials|). Also a per-node profile of the served int8 model at batch 32.

    .venv/bin/python -m benchmarks.quantization [--rounds 5] [--threads 1 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_data_dir_argument, log, require_data_dir
from export.validation import Embed

BATCHES = (1, 8, 32)
REQUEST_PARTIALS = 8


# ---------------------------------------------------------------- the unrolled variant


def unrolled_static_int8(encoder: Any, calibration: np.ndarray, path: Path) -> dict[str, Any]:
    """Layers 2 and 3 unrolled over time with constant activation scales (see module doc)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from export import int8_invariant as inv
    from export.onnx_export import PARTIAL_FRAMES

    layers, linear_w, linear_b = inv.encoder_weights(encoder)
    bounds = inv.kernel_bounds()
    hessians = inv.calibration_hessians(encoder, calibration, bounds)
    hidden = inv.layer_outputs(encoder, calibration)
    # one scale per layer output (uint8, zero point 128): the calibration's max |h|
    scales = [float(np.abs(h).max()) / 127.5 for h in hidden]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    counter = iter(range(1 << 30))
    h_size = inv.HIDDEN

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(kind: str, inputs: list[str], outputs: int = 1, **attrs: Any) -> list[str]:
        names = [f"t{next(counter)}" for _ in range(outputs)]
        domain = inv.MS_DOMAIN if kind == "MatMulIntegerToFloat" else ""
        nodes.append(helper.make_node(kind, inputs, names, domain=domain, **attrs))
        return names

    const("zp", np.array(128, np.uint8))
    const("wzp", np.array(0, np.int8))
    const("axis1", np.array([1], np.int64))
    const("split_gates", np.array([3 * h_size, h_size], np.int64))
    first = layers[0]
    (x,) = op("Transpose", ["mels"], perm=[1, 0, 2])
    (y0, *_) = op(
        "LSTM",
        [
            x,
            const("w0", first.w[None]),
            const("r0", first.r[None]),
            const("b0", np.concatenate([first.bias, np.zeros_like(first.bias)])[None]),
        ],
        outputs=3,
        hidden_size=h_size,
    )
    (x,) = op("Squeeze", [y0, "axis1"])
    h = ""
    for index in (1, 2):
        layer = layers[index]
        # ONNX gate order (i, o, f, c) → (i, o, f | c): one Sigmoid over the first three
        wq, rq = inv.gptq([layer.w, layer.r], hessians[index])
        sx = const(f"sx{index}", np.array(scales[index - 1], np.float32))
        sh = const(f"sh{index}", np.array(scales[index], np.float32))
        (xq,) = op("QuantizeLinear", [x, sx, "zp"])
        (projection,) = op(
            "MatMulIntegerToFloat",
            [
                xq,
                const(f"wq{index}", wq.q.T.copy()),
                sx,
                const(f"ws{index}", wq.scale),
                "zp",
                "wzp",
                const(f"b{index}", layer.bias),
            ],
        )
        steps = op("Split", [projection], outputs=PARTIAL_FRAMES, axis=0)
        rq_name, rs_name = const(f"rq{index}", rq.q.T.copy()), const(f"rs{index}", rq.scale)
        c, h, outputs = "", "", []
        for step in steps:
            pre = step
            if h:
                (hq,) = op("QuantizeLinear", [h, sh, "zp"])
                (recurrent,) = op("MatMulIntegerToFloat", [hq, rq_name, sh, rs_name, "zp", "wzp"])
                (pre,) = op("Add", [recurrent, step])
            sig, cell = op("Split", [pre, "split_gates"], outputs=2, axis=2)
            (sig,) = op("Sigmoid", [sig])
            i, o, f = op("Split", [sig], outputs=3, axis=2)
            (cell,) = op("Tanh", [cell])
            (update,) = op("Mul", [i, cell])
            if c:
                (kept,) = op("Mul", [f, c])
                (update,) = op("Add", [kept, update])
            c = update
            (tanh_c,) = op("Tanh", [c])
            (h,) = op("Mul", [o, tanh_c])
            outputs.append(h)
        if index == 1:
            (x,) = op("Concat", outputs, axis=0)
    const("axis0", np.array([0], np.int64))
    (last,) = op("Squeeze", [h, "axis0"])
    (linear,) = op("MatMul", [last, const("linear_w", linear_w.T.copy())])
    (biased,) = op("Add", [linear, const("linear_b", linear_b)])
    (relu,) = op("Relu", [biased])
    (norm,) = op("ReduceL2", [relu], axes=[1], keepdims=1)
    nodes.append(helper.make_node("Div", [relu, norm], ["embedding"]))
    graph = helper.make_graph(
        nodes,
        "ge2e_unrolled_static_int8",
        [helper.make_tensor_value_info("mels", TensorProto.FLOAT, ["batch", 160, 40])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 256])],
        inits,
    )
    opsets = [helper.make_opsetid("", inv.OPSET), helper.make_opsetid(inv.MS_DOMAIN, 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return {"activation_scales": [round(s, 6) for s in scales], "nodes": len(nodes)}


# ---------------------------------------------------------------- measuring


def ratio_to_fp32(
    speeds: dict[str, dict[str, dict[str, float]]], rounds_of: str = "partials_per_cpu_s"
) -> dict[str, dict[str, float]]:
    return {
        name: {
            b: round(v[rounds_of] / speeds["fp32"][b][rounds_of], 2) for b, v in by_batch.items()
        }
        for name, by_batch in speeds.items()
    }


def node_profile(model: Path, batch: int = 32, runs: int = 10) -> dict[str, float]:
    """Milliseconds per run by node, ONNX Runtime's profiler, 1 thread."""
    import onnxruntime

    from export.validation import random_partials

    with tempfile.TemporaryDirectory() as tmp:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        mels = random_partials(batch, seed=1)
        for _ in range(runs):
            sess.run(None, {"mels": mels})
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["name"].removesuffix("_kernel_time")] += event["dur"] / 1000 / runs
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v > 0.1}


def per_request(embed: Embed, size: int = REQUEST_PARTIALS) -> Embed:
    """Run a batch as separate requests of `size` partials, as a per-request model.py would."""

    def split(mels: np.ndarray) -> np.ndarray:
        return np.concatenate([embed(mels[i : i + size]) for i in range(0, len(mels), size)])

    return split


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_argument(parser)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="CPU seconds per timing")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--validation-utterances", type=int, default=40)
    parser.add_argument("--trial-recordings", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    data_dir = require_data_dir(parser, args.data_dir)

    import onnx

    from export import evaluation, int8_invariant, validation
    from export.devdata import load_dev_set
    from export.encoder import load_encoder
    from export.onnx_export import export_onnx, run, session
    from export.quantize import quantize_int8
    from export.throughput import compare

    started = time.perf_counter()
    dev = load_dev_set(data_dir, args.validation_utterances)
    recordings = evaluation.recordings(data_dir)
    candidates = [p for p in recordings if p.name not in set(dev.files)]
    calibration, calibration_files = evaluation.calibration_sample(
        candidates,
        int8_invariant.CALIBRATION_SEED,
        int8_invariant.CALIBRATION_FILES,
        int8_invariant.CALIBRATION_PARTIALS,
    )
    trials = [p for p in recordings if p.name not in set(calibration_files)]
    trials = trials[: args.trial_recordings] if args.trial_recordings else trials
    halves = evaluation.load_halves(trials)
    log(f"dev data: {len(dev.files)} utterances, {len(halves.files)} trial recordings")

    encoder = load_encoder()
    bounds = int8_invariant.kernel_bounds()
    results: dict[str, Any] = {"bounds": bounds.as_dict(), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="voicegate-quant-") as scratch:
        work = Path(scratch)
        paths = {"fp32": export_onnx(encoder, work / "fp32.onnx")}
        quantize_int8(paths["fp32"], work / "dynamic.onnx")
        paths["dynamic int8"] = work / "dynamic.onnx"
        for name, cal in (
            ("invariant int8 (GPTQ)", calibration),
            ("invariant int8 (nearest)", None),
        ):
            path = work / f"{name.split()[-1].strip('()')}.onnx"
            onnx.save(int8_invariant.build_model(encoder, bounds, cal), str(path))
            paths[name] = path
        log("building the unrolled variant")
        results["unrolled"] = unrolled_static_int8(encoder, calibration, work / "unrolled.onnx")
        paths["unrolled static int8"] = work / "unrolled.onnx"
        sessions = {name: session(path) for name, path in paths.items()}
        embeds: dict[str, Embed] = {
            name: functools.partial(run, sess) for name, sess in sessions.items()
        }
        embeds["dynamic int8, per request"] = per_request(embeds["dynamic int8"])
        sizes = {name: paths[name].stat().st_size for name in paths}
        sizes["dynamic int8, per request"] = sizes["dynamic int8"]

        reference_halves = evaluation.embed_halves(embeds["fp32"], halves)
        reference_whole = validation.utterance_embeddings(embeds["fp32"], dev.partials)
        half_names = [f"{f} (1st)" for f in halves.files] + [f"{f} (2nd)" for f in halves.files]
        mates = validation.random_partials(40, seed=11)
        targets = dev.all_partials[:24]
        for name, embed in embeds.items():
            log(f"accuracy and invariance: {name}")
            whole = validation.batched_utterance_embeddings(
                embed, dev.partials, evaluation.SERVED_BATCH
            )
            both = evaluation.embed_halves(embed, halves)
            results["variants"][name] = {
                "onnx_bytes": sizes[name],
                "cosine_whole_utterances": validation.check_cosine(
                    name, whole, reference_whole, dev.files, limit=None
                ),
                "cosine_trial_halves": validation.check_cosine(
                    name,
                    np.concatenate(both),
                    np.concatenate(reference_halves),
                    half_names,
                    limit=None,
                ),
                "eer": evaluation.equal_error_rate(*both),
                "batch_invariance": evaluation.batch_invariance(
                    # per request: every partial of the check is a request of its own
                    per_request(embeds["dynamic int8"], 1) if "per request" in name else embed,
                    targets,
                    mates,
                ),
            }
        for threads in args.threads:
            log(f"throughput, {threads} thread(s), {args.rounds} rounds")
            timed = embeds
            if threads != 1:
                more = {n: session(p, threads) for n, p in paths.items()}
                timed = {n: functools.partial(run, sess) for n, sess in more.items()}
                timed["dynamic int8, per request"] = per_request(timed["dynamic int8"])
            timings = compare(timed, BATCHES, args.rounds, args.seconds, threads)
            speeds = {name: figures["by_batch"] for name, figures in timings.items()}
            results[f"throughput_{threads}_threads"] = {
                "by_variant": speeds,
                "ratio_to_fp32_cpu_time": ratio_to_fp32(speeds),
                "ratio_to_fp32_wall": ratio_to_fp32(speeds, "partials_per_s"),
            }
        results["profile_invariant_int8_batch32_ms"] = node_profile(paths["invariant int8 (GPTQ)"])
        results["profile_fp32_batch32_ms"] = node_profile(paths["fp32"])
    results["calibration"] = {"seed": int8_invariant.CALIBRATION_SEED, "files": calibration_files}
    results["seconds"] = round(time.perf_counter() - started, 1)
    print_table(results, args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_table(results: dict[str, Any], threads: Sequence[int]) -> None:
    speeds = results[f"throughput_{threads[0]}_threads"]
    header = (
        f"{'variant':28s} {'MB':>5s} {'cos min':>8s} {'cos mean':>9s} {'EER %':>6s} "
        + " ".join(f"{'p/s@' + str(b):>7s}" for b in BATCHES)
        + f" {'x fp32@32':>9s} {'batch dep.':>10s}"
    )
    print(header)
    for name, v in results["variants"].items():
        cos_min = min(
            v["cosine_whole_utterances"]["cosine_min"], v["cosine_trial_halves"]["cosine_min"]
        )
        by_batch = speeds["by_variant"][name]
        print(
            f"{name:28s} {v['onnx_bytes'] / 1e6:5.2f} {cos_min:8.5f} "
            f"{v['cosine_trial_halves']['cosine_mean']:9.6f} {v['eer']['eer_percent']:6.2f} "
            + " ".join(f"{by_batch[str(b)]['partials_per_cpu_s']:7.0f}" for b in BATCHES)
            + f" {speeds['ratio_to_fp32_cpu_time'][name]['32']:9.2f}"
            f" {v['batch_invariance']['max_abs_diff']:10.2g}"
        )
    for extra in threads[1:]:
        ratios = results[f"throughput_{extra}_threads"]["ratio_to_fp32_wall"]
        print(
            f"{extra} threads, x fp32 at batch 32 (wall clock: noisy on a shared machine): "
            + ", ".join(f"{n} {r['32']:.2f}" for n, r in ratios.items())
        )
    spread = max(b["spread"] for v in speeds["by_variant"].values() for b in v.values())
    print(
        f"(p/s: partials per CPU-second, median of rounds, largest spread {spread:.0%}; cosine "
        "to fp32 over whole utterances and trial halves; batch dep.: max abs change of an "
        f"embedding alone vs batched; {results['seconds']} s)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
