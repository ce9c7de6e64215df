"""GPU precision plan of the GE2E encoder: throughput and cosine to fp32 per precision.

Standalone on a bare GPU host (Python 3.10+; needs numpy and onnx, and onnxruntime-gpu
and/or torch with CUDA; nothing from voicegate):

    python benchmarks/gpu_precision.py --onnx-dir build/model_repository_gpu [--json out.json]

`--onnx-dir` is a folder of .onnx files or a Triton repository (`<model>/1/model.onnx`), as
`voicegate export --target gpu` writes: ge2e_fp32, ge2e_fp16 (and ge2e_trt_fp16, the fp32 file
again). What runs, each where available:

- ONNX Runtime, CUDA execution provider: every model in the folder (CPU fallback disabled,
  so a model with operators that have no CUDA kernel, like the CPU int8 one, is reported as
  not runnable rather than timed half on the CPU).
- ONNX Runtime, TensorRT execution provider: the fp32 model with FP16 enabled (what the
  `ge2e_trt_fp16` config asks Triton for) and in FP32, with one optimisation profile for
  batch 1..64.
- PyTorch + cuDNN, a labelled proxy when ONNX Runtime has no GPU provider here: the same
  network rebuilt from the fp32 ONNX weights (3-layer LSTM, linear, ReLU, L2 norm), in fp32,
  TF32, fp16 and bf16.

Inputs: `--mels FILE.npy` (real partials [n, 160, 40] power mel) or power-mel-like noise
(log-uniform 1e-8..30, the range real partials span). Per variant: milliseconds per batch
and partials/s at each batch size (median of `--iters` timed runs after warm-up; ONNX Runtime
figures include the host-device copies of input and output, about 0.8 MB at batch 32), and
the cosine of each partial's embedding to the fp32 embedding of the same engine (min, mean)
and to ONNX Runtime CPU fp32 when it is installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FRAMES, MELS = 160, 40
Embed = Callable[[np.ndarray], np.ndarray]


def power_mel_noise(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (10.0 ** rng.uniform(-8.0, 1.5, size=(n, FRAMES, MELS))).astype(np.float32)


def find_models(folder: Path) -> dict[str, Path]:
    """name → .onnx path: `<name>/1/model.onnx` (Triton layout) or `<name>.onnx`."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.onnx")):
        if path.name == "model.onnx" and path.parent.name.isdigit():
            found[path.parent.parent.name] = path
        else:
            found[path.stem] = path
    return found


# ---------------------------------------------------------------- ONNX Runtime


def ort_session(path: Path, providers: list[Any], cpu_fallback: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return ort.InferenceSession(str(path), options, providers=providers)


def ort_embed(sess: Any) -> Embed:
    def embed(mels: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(["embedding"], {"mels": mels})[0], dtype=np.float32)

    return embed


def tensorrt_options(fp16: bool, cache: Path) -> dict[str, Any]:
    return {
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_profile_min_shapes": f"mels:1x{FRAMES}x{MELS}",
        "trt_profile_opt_shapes": f"mels:32x{FRAMES}x{MELS}",
        "trt_profile_max_shapes": f"mels:64x{FRAMES}x{MELS}",
    }


def ort_variants(models: dict[str, Path], cache: Path) -> tuple[dict[str, Embed], dict[str, str]]:
    """(runnable variants, reasons for the ones that are not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {}, {"onnxruntime": "not installed"}
    available = ort.get_available_providers()
    variants: dict[str, Embed] = {}
    skipped: dict[str, str] = {}
    if "CUDAExecutionProvider" in available:
        for name, path in models.items():
            if name == "ge2e_trt_fp16":
                continue  # the same file as ge2e_fp32; it is the TensorRT variant below
            try:
                sess = ort_session(path, ["CUDAExecutionProvider"])
                variants[f"ort-cuda {name}"] = ort_embed(sess)
            except Exception as exc:  # e.g. int8 operators without CUDA kernels
                skipped[f"ort-cuda {name}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    else:
        skipped["ort-cuda"] = f"no CUDAExecutionProvider (available: {available})"
    fp32 = models.get("ge2e_fp32") or next((p for n, p in models.items() if "fp32" in n), None)
    if "TensorrtExecutionProvider" in available and fp32 is not None:
        for label, fp16 in (("fp16", True), ("fp32", False)):
            name = f"ort-tensorrt {label}"
            try:
                providers = [
                    ("TensorrtExecutionProvider", tensorrt_options(fp16, cache)),
                    "CUDAExecutionProvider",
                ]
                variants[name] = ort_embed(ort_session(fp32, providers))
            except Exception as exc:
                skipped[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    else:
        skipped["ort-tensorrt"] = "no TensorrtExecutionProvider (or no fp32 model)"
    return variants, skipped


def ort_cpu_reference(models: dict[str, Path]) -> Embed | None:
    fp32 = models.get("ge2e_fp32")
    if fp32 is None:
        return None
    try:
        return ort_embed(ort_session(fp32, ["CPUExecutionProvider"], cpu_fallback=True))
    except Exception:
        return None


# ---------------------------------------------------------------- PyTorch proxy


def torch_encoder_from_onnx(path: Path) -> Any:
    """The GE2E network as torch modules, weights read from the fp32 ONNX file."""
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in model.graph.initializer}
    lstms = [n for n in model.graph.node if n.op_type == "LSTM"]
    if len(lstms) != 3:
        raise ValueError(f"{path}: expected 3 LSTM nodes, found {len(lstms)}")
    hidden = next(a.i for a in lstms[0].attribute if a.name == "hidden_size")
    onnx_to_torch = [0, 2, 3, 1]  # ONNX gates (i, o, f, c) → torch (i, f, g, o)

    def reorder(a: np.ndarray) -> torch.Tensor:
        blocks = np.split(a, 4, axis=0)
        return torch.from_numpy(np.concatenate([blocks[g] for g in onnx_to_torch], axis=0))

    lstm = torch.nn.LSTM(MELS, hidden, 3, batch_first=True)
    with torch.no_grad():
        for layer, node in enumerate(lstms):
            w, r, b = (init[node.input[k]][0] for k in (1, 2, 3))
            getattr(lstm, f"weight_ih_l{layer}").copy_(reorder(w))
            getattr(lstm, f"weight_hh_l{layer}").copy_(reorder(r))
            getattr(lstm, f"bias_ih_l{layer}").copy_(reorder(b[: 4 * hidden]))
            getattr(lstm, f"bias_hh_l{layer}").copy_(reorder(b[4 * hidden :]))
    weight, bias = _linear(model, init)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight))
        linear.bias.copy_(torch.from_numpy(bias))

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.linear = lstm, linear

        def forward(self, mels: torch.Tensor) -> torch.Tensor:
            _, (h, _) = self.lstm(mels)
            raw = torch.relu(self.linear(h[-1]))
            return raw / torch.norm(raw, dim=1, keepdim=True)

    return Encoder().eval()


def _linear(model: Any, init: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(weight [out, in], bias) of the final linear layer: a Gemm, or MatMul then Add."""
    for node in model.graph.node:
        if node.op_type == "Gemm" and node.input[1] in init:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            weight = init[node.input[1]]
            return (weight if trans_b else weight.T), init[node.input[2]]
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in init)
    add = next(n for n in model.graph.node if n.op_type == "Add" and matmul.output[0] in n.input)
    bias_name = next(i for i in add.input if i in init)
    return init[matmul.input[1]].T, init[bias_name]


def torch_variants(models: dict[str, Path]) -> tuple[dict[str, Embed], dict[str, str]]:
    try:
        import torch
    except ImportError:
        return {}, {"torch": "not installed"}
    if not torch.cuda.is_available():
        return {}, {"torch": "CUDA not available"}
    fp32 = models.get("ge2e_fp32") or next((p for n, p in models.items() if "fp32" in n), None)
    if fp32 is None:
        return {}, {"torch": "no fp32 ONNX model to read the weights from"}
    base = torch_encoder_from_onnx(fp32)
    variants: dict[str, Embed] = {}
    for label, dtype, tf32 in (
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("fp16", torch.float16, False),
        ("bf16", torch.bfloat16, False),
    ):
        module = torch_encoder_from_onnx(fp32).to("cuda", dtype) if label != "fp32" else base.cuda()
        module.lstm.flatten_parameters()  # one contiguous weight buffer for cuDNN

        def embed(mels: np.ndarray, m: Any = module, d: Any = dtype, t: bool = tf32) -> np.ndarray:
            torch.backends.cuda.matmul.allow_tf32 = t
            torch.backends.cudnn.allow_tf32 = t
            with torch.no_grad():
                x = torch.from_numpy(mels).to("cuda", d, non_blocking=True)
                out = m(x).float().cpu().numpy()
            return np.asarray(out)

        variants[f"torch-cudnn {label} (proxy)"] = embed
    return variants, {}


# ---------------------------------------------------------------- measuring


def time_batch(embed: Embed, mels: np.ndarray, iters: int, warmup: int = 5) -> float:
    """Median milliseconds per call (each call returns results on the host: synchronised)."""
    for _ in range(warmup):
        embed(mels)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        embed(mels)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def cosine(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    c = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    c = np.nan_to_num(c, nan=-1.0)
    return {"min": round(float(c.min()), 6), "mean": round(float(c.mean()), 6)}


def reference_name(name: str, names: list[str]) -> str | None:
    """The fp32 variant of the same engine."""
    engine = name.split()[0]
    candidates = [n for n in names if n.startswith(engine) and "fp32" in n]
    return candidates[0] if candidates else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--mels", type=Path, help="real partials [n, 160, 40] as .npy")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--accuracy-partials", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    models = find_models(args.onnx_dir)
    if not models:
        parser.error(f"no .onnx files under {args.onnx_dir}")
    mels = (
        np.load(args.mels).astype(np.float32)
        if args.mels
        else power_mel_noise(max(args.accuracy_partials, max(args.batches)))
    )
    cache = args.onnx_dir / ".trt_cache"
    cache.mkdir(exist_ok=True)
    variants, skipped = ort_variants(models, cache)
    proxy, proxy_skipped = torch_variants(models)
    skipped.update(proxy_skipped)
    if not any(n.startswith("ort-") for n in variants):
        variants.update(proxy)  # the proxy only where ONNX Runtime cannot use the GPU
    elif proxy:
        skipped["torch proxy"] = "not needed: ONNX Runtime runs on the GPU here"
    if not variants:
        print(f"nothing runs on a GPU here: {skipped}", file=sys.stderr)
        return 1
    accuracy_set = mels[: args.accuracy_partials]
    outputs = {
        name: np.concatenate(
            [embed(accuracy_set[i : i + 64]) for i in range(0, len(accuracy_set), 64)]
        )
        for name, embed in variants.items()
    }
    cpu_reference = ort_cpu_reference(models)
    cpu_out = cpu_reference(accuracy_set) if cpu_reference else None
    results: dict[str, Any] = {"models": {k: str(v) for k, v in models.items()}, "variants": {}}
    for name, embed in variants.items():
        ref = reference_name(name, list(variants))
        row: dict[str, Any] = {
            "cosine_to_fp32_same_engine": cosine(outputs[name], outputs[ref]) if ref else None,
            "cosine_to_ort_cpu_fp32": cosine(outputs[name], cpu_out)
            if cpu_out is not None
            else None,
            "by_batch": {},
        }
        for batch in args.batches:
            batch_mels = np.ascontiguousarray(np.resize(mels, (batch, FRAMES, MELS)))
            ms = time_batch(embed, batch_mels, args.iters)
            row["by_batch"][str(batch)] = {
                "ms": round(ms, 3),
                "partials_per_s": round(1000 * batch / ms, 1),
            }
        results["variants"][name] = row
    results["skipped"] = skipped
    results["input"] = str(args.mels) if args.mels else "power-mel-like noise"
    results["environment"] = environment()
    print_table(results, args.batches)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "numpy": np.__version__}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return env


def print_table(results: dict[str, Any], batches: list[int]) -> None:
    print(f"environment: {results['environment']}")
    print(f"input: {results['input']}")
    head = f"{'variant':34s} {'cos min':>8s} {'cos mean':>9s} {'vs CPU':>8s} "
    print(head + " ".join(f"{'ms@' + str(b):>8s} {'p/s@' + str(b):>9s}" for b in batches))
    for name, row in results["variants"].items():
        same = row["cosine_to_fp32_same_engine"] or {"min": float("nan"), "mean": float("nan")}
        cpu = row["cosine_to_ort_cpu_fp32"] or {"min": float("nan")}
        cells = " ".join(
            f"{row['by_batch'][str(b)]['ms']:8.2f} {row['by_batch'][str(b)]['partials_per_s']:9.0f}"
            for b in batches
        )
        print(f"{name:34s} {same['min']:8.5f} {same['mean']:9.6f} {cpu['min']:8.5f} {cells}")
    for name, reason in results["skipped"].items():
        print(f"skipped {name}: {reason}")


if __name__ == "__main__":
    raise SystemExit(main())
