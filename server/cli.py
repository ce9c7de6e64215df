"""The `voicegate` command: serve, export, calibrate, and client calls to a running server.

Only argparse and the settings are imported up front; each subcommand imports what it needs,
so `voicegate --help` loads none of the heavy dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from server import __version__

if TYPE_CHECKING:
    from server.client import Connection

DEFAULT_SERVER = "localhost:50051"
# numpy's OpenBLAS (and OpenMP) spin threads that fight ONNX Runtime and the Triton stub for
# the cores; one thread each is measured several times faster on small machines.
_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voicegate",
        description="Speaker embedding and verification over gRPC, served by Triton.",
    )
    parser.add_argument("--version", action="version", version=f"voicegate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC front server (and embedded Triton)")
    serve.add_argument("--host", help="address to bind (env VOICEGATE_HOST, default [::])")
    serve.add_argument("--port", type=int, help="gRPC port (env VOICEGATE_PORT, default 50051)")
    serve.add_argument(
        "--triton-url",
        help="HOST:PORT of an external Triton's gRPC endpoint; none is started "
        "(env VOICEGATE_TRITON_URL; default: start the embedded Triton)",
    )
    serve.add_argument("--model-repository", type=Path, help="Triton model repository")
    serve.add_argument("--encoder-model", help="default encoder model (ge2e_int8)")
    serve.add_argument("--calibration-file", type=Path, help="fusion calibration JSON")
    serve.add_argument(
        "--store-url",
        help="speaker store: sqlite:///PATH or postgresql://... (env VOICEGATE_STORE_URL; "
        "default sqlite:///<state dir>/speakers.db)",
    )
    serve.add_argument("--tls-cert-file", type=Path, help="server certificate (PEM) for TLS")
    serve.add_argument("--tls-key-file", type=Path, help="private key (PEM) of --tls-cert-file")
    serve.add_argument(
        "--tls-client-ca-file",
        type=Path,
        help="CA (PEM) for client certificates: mutual TLS, a client certificate is required",
    )
    serve.add_argument(
        "--auth-tokens-file",
        type=Path,
        help="bearer tokens as 'sha256:<hex> [Method,...|*]' lines (see `voicegate hash-token`); "
        "unset: no authentication",
    )
    serve.add_argument("--grace-seconds", type=float, help="drain time on SIGTERM")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    serve.add_argument(
        "--log-format", choices=("text", "json"), help="log lines as text (default) or JSON"
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port (env VOICEGATE_METRICS_PORT, default 9464; 0: off). "
        "Traces: the standard OTEL_* variables, e.g. OTEL_EXPORTER_OTLP_ENDPOINT",
    )

    export = commands.add_parser("export", help="export the models into a Triton repository")
    export.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    export.add_argument(
        "--repository",
        type=Path,
        help="output repository (default: model_repository for cpu, build/model_repository_gpu)",
    )
    export.add_argument("--data-dir", type=Path, help="dev speech (env VOICEGATE_DATA_DIR)")
    export.add_argument("--validation-utterances", type=int, default=40)
    export.add_argument(
        "--vad-only",
        action="store_true",
        help="build and install only the Silero VAD model, leaving the encoders as they are",
    )

    calibrate = commands.add_parser("calibrate", help="fit score fusion and threshold")
    calibrate.add_argument("--data-dir", type=Path, help="dev speech (env VOICEGATE_DATA_DIR)")
    calibrate.add_argument(
        "--model", type=Path, default=Path("model_repository/ge2e_int8/1/model.onnx")
    )
    calibrate.add_argument(
        "--trim",
        choices=["vad", "energy"],
        help="silence trim to fit for (default: the server's, env VOICEGATE_TRIM)",
    )
    calibrate.add_argument(
        "--vad-model", type=Path, default=Path("model_repository/silero_vad/1/model.onnx")
    )
    calibrate.add_argument(
        "--output",
        type=Path,
        help="calibration JSON to write (default: the packaged file of the trim, "
        "server/calibration.json or server/calibration-energy.json)",
    )
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument(
        "--target-far",
        type=float,
        default=0.01,
        help="false-accept rate the decision threshold is chosen for on held-out development "
        "trials (default 0.01); 0 chooses the equal-error point instead",
    )

    embed = commands.add_parser("embed", help="embed an audio file with a running server")
    embed.add_argument("file", type=Path)
    embed.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT of voicegate")
    _add_connection_arguments(embed)
    embed.add_argument("--model", default="", help="encoder model (server default if empty)")

    verify = commands.add_parser("verify", help="compare the speakers of two audio files")
    verify.add_argument("file_a", type=Path)
    verify.add_argument("file_b", type=Path)
    verify.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT of voicegate")
    _add_connection_arguments(verify)

    vad = commands.add_parser("vad", help="list the speech segments of an audio file")
    vad.add_argument("file", type=Path)
    vad.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT of voicegate")
    _add_connection_arguments(vad)

    health = commands.add_parser(
        "health",
        help="ask a running server's gRPC health service; exit 0 when SERVING (container probe)",
    )
    health.add_argument("--server", default=DEFAULT_SERVER, help="HOST:PORT of voicegate")
    _add_connection_arguments(health, token=False)
    health.add_argument(
        "--service",
        default="",
        help="service to check: '' (default) for the whole server, or voicegate.v1.SpeakerService",
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the reply")

    commands.add_parser(
        "hash-token",
        help="read a bearer token on stdin, print its sha256:<hex> line for the token file",
    )
    return parser


def _add_connection_arguments(command: argparse.ArgumentParser, token: bool = True) -> None:
    command.add_argument("--tls-ca", type=Path, help="CA (PEM) of the server's cert: use TLS")
    command.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    command.add_argument("--tls-key", type=Path, help="private key (PEM) of --tls-cert")
    if token:
        command.add_argument(
            "--token",
            default=os.environ.get("VOICEGATE_TOKEN") or None,
            help="bearer token (default: env VOICEGATE_TOKEN, which keeps it out of `ps`)",
        )


def _connection(args: argparse.Namespace) -> Connection:
    from server.client import Connection

    return Connection(
        args.server, args.tls_ca, args.tls_cert, args.tls_key, getattr(args, "token", None)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in _THREAD_VARIABLES:
        os.environ.setdefault(name, "1")
    from server.errors import VoicegateError

    try:
        return _COMMANDS[args.command](args)
    except VoicegateError as exc:
        print(f"voicegate {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import gc

    from server.app import serve
    from server.config import Settings
    from server.logs import configure_logging

    settings = Settings.load(
        {
            "host": args.host,
            "port": args.port,
            "triton_url": args.triton_url,
            "model_repository": args.model_repository,
            "encoder_model": args.encoder_model,
            "calibration_file": args.calibration_file,
            "store_url": args.store_url,
            "grace_seconds": args.grace_seconds,
            "tls_cert_file": args.tls_cert_file,
            "tls_key_file": args.tls_key_file,
            "tls_client_ca_file": args.tls_client_ca_file,
            "auth_tokens_file": args.auth_tokens_file,
            "log_level": args.log_level,
            "log_format": args.log_format,
            "metrics_port": args.metrics_port,
        }
    )
    configure_logging(settings.log_level, settings.log_format)
    # A traced call leaves ~90 SDK objects in the span exporter's queue until its next flush;
    # at the default young-generation threshold (700) that starts a collection every few
    # calls. Measured: GC 0.08 -> 0.00 ms per Embed with tracing on.
    gc.set_threshold(10_000, 10, 10)
    asyncio.run(serve(settings))
    return 0


def _export(args: argparse.Namespace) -> int:
    from export.pipeline import run_export
    from server.config import Settings

    settings = Settings.load({"data_dir": args.data_dir})
    run_export(
        target=args.target,
        repository=args.repository,
        data_dir=settings.data_dir,
        validation_utterances=args.validation_utterances,
        vad_only=args.vad_only,
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from server.calibration import main as calibrate_main
    from server.config import Settings
    from server.errors import ConfigError
    from server.fusion import PACKAGED_FILES

    settings = Settings.load({"data_dir": args.data_dir, "trim": args.trim})
    if settings.data_dir is None:
        raise ConfigError("calibrate needs dev speech: pass --data-dir or set VOICEGATE_DATA_DIR")
    target_far = args.target_far or None  # 0: the equal-error point
    output = args.output or Path("server") / PACKAGED_FILES[settings.trim]
    return calibrate_main(
        settings.data_dir,
        args.model,
        output,
        args.seed,
        target_far,
        settings.trim,
        args.vad_model,
    )


def _embed(args: argparse.Namespace) -> int:
    from server.client import embed_file, report_rpc_error

    with report_rpc_error():
        response = embed_file(_connection(args), args.file, args.model)
        print(
            f"model {response.model}, {response.speech_seconds:.2f} s of speech, "
            f"{response.partial_count} partials"
        )
        print(" ".join(f"{value:.6f}" for value in response.embedding))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from server.client import report_rpc_error, verify_files

    with report_rpc_error():
        response = verify_files(_connection(args), args.file_a, args.file_b)
        verdict = "same speaker" if response.same_speaker else "different speakers"
        scores = ", ".join(f"{s.model} {s.score:.4f}" for s in response.scores)
        print(
            f"{verdict}: score {response.score:.4f} (threshold {response.threshold:.4f}; {scores})"
        )
    return 0


def _vad(args: argparse.Namespace) -> int:
    from server.client import detect_speech_file, report_rpc_error

    with report_rpc_error():
        response = detect_speech_file(_connection(args), args.file)
        print(f"{response.speech_seconds:.2f} s of speech in {response.audio_seconds:.2f} s")
        for segment in response.segments:
            print(
                f"{segment.start_seconds:9.3f} {segment.end_seconds:9.3f}  "
                f"p={segment.mean_probability:.2f}"
            )
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from server.client import Connection

    request = health_pb2.HealthCheckRequest(service=args.service)
    connection = Connection(args.server, args.tls_ca, args.tls_cert, args.tls_key)
    with connection.channel() as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            print(f"voicegate health: {args.server}: {code}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _hash_token(args: argparse.Namespace) -> int:
    from server.errors import ConfigError
    from server.security import hash_token

    token = sys.stdin.readline().strip()
    if not token:
        raise ConfigError("hash-token reads the token on stdin; got an empty line")
    print(hash_token(token))
    return 0


_COMMANDS = {
    "serve": _serve,
    "export": _export,
    "calibrate": _calibrate,
    "embed": _embed,
    "verify": _verify,
    "vad": _vad,
    "health": _health,
    "hash-token": _hash_token,
}

if __name__ == "__main__":
    sys.exit(main())
