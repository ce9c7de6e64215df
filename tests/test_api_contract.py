"""The API as a product: buf lint and breaking checks, documentation of every element, and the
code-generation setup for other languages.

buf comes from examples/node's lockfile (installed by the Makefile, or by conftest's
node_modules fixture for a lone pytest run). The documentation checks read the descriptors
protoc builds with source info, so they run without Node too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2

from server import errors

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PROTOS = sorted(PROTO_DIR.glob("voicegate/v1/*.proto"))
RELEASED = PROTO_DIR / "released" / "voicegate-v1.binpb"
NODE_DIR = ROOT / "examples" / "node"

# Errors raised only at start-up or by tools, never returned to a caller.
NOT_RETURNED = {errors.ConfigError, errors.ExportError}
# Returned by gRPC itself (message over the size limit), not by voicegate's code.
FROM_GRPC = {"RESOURCE_EXHAUSTED"}


# --- buf -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def buf(node_modules: Path) -> Path:
    return node_modules / ".bin" / "buf"


def run_buf(buf: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_buf_lint_passes(buf: Path) -> None:
    result = run_buf(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_released_api(buf: Path) -> None:
    result = run_buf(buf, "breaking", "--against", str(RELEASED.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A scratch copy of the buf workspace (buf.yaml + proto/) to break on purpose."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(PROTO_DIR, tmp_path / "proto")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_breaking_check_catches_a_renumbered_and_a_removed_field(
    buf: Path, workspace: Path
) -> None:
    speaker = workspace / "proto" / "voicegate" / "v1" / "speaker.proto"
    edit(speaker, "string model = 2;\n}\n\n// Response of Embed.", "string model = 5;\n}\n\n// R.")
    edit(speaker, "  float threshold = 3;\n", "")
    result = run_buf(buf, "breaking", "--against", str(RELEASED), cwd=workspace)
    assert result.returncode != 0
    assert "EmbedRequest" in result.stdout and "VerifyResponse" in result.stdout, result.stdout


def test_lint_requires_a_comment_on_every_field(buf: Path, workspace: Path) -> None:
    audio = workspace / "proto" / "voicegate" / "v1" / "audio.proto"
    text, removed = re.subn(
        r"(?:\n  //[^\n]*)+\n(  int32 channels = 4;)", r"\n\1", audio.read_text()
    )
    assert removed == 1
    audio.write_text(text)
    result = run_buf(buf, "lint", "--error-format", "config-ignore-yaml", cwd=workspace)
    assert result.returncode != 0
    assert "COMMENT_FIELD" in result.stdout, result.stdout


# --- documentation of every element, from protoc's source info ------------------------------


@pytest.fixture(scope="module")
def source_files(
    tmp_path_factory: pytest.TempPathFactory,
) -> list[descriptor_pb2.FileDescriptorProto]:
    from importlib.resources import files

    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("descriptors") / "api.binpb"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{files('grpc_tools') / '_proto'}",  # well-known types (google/protobuf/*.proto)
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *(str(p.relative_to(PROTO_DIR)) for p in PROTOS),
    ]
    assert protoc.main(args) == 0
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


def comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(loc.path): loc.leading_comments.strip()
        for loc in file.source_code_info.location
        if loc.leading_comments.strip()
    }


def elements(file: descriptor_pb2.FileDescriptorProto) -> list[tuple[str, tuple[int, ...], object]]:
    """(name, source path, descriptor) of every documentable element of one file."""
    found: list[tuple[str, tuple[int, ...], object]] = []
    for si, service in enumerate(file.service):
        found.append((service.name, (6, si), service))
        for mi, method in enumerate(service.method):
            found.append((f"{service.name}.{method.name}", (6, si, 2, mi), method))

    def message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        name = f"{prefix}{msg.name}"
        found.append((name, path, msg))
        for fi, field in enumerate(msg.field):
            found.append((f"{name}.{field.name}", (*path, 2, fi), field))
        # proto3 `optional` fields live in synthetic oneofs that cannot carry a comment
        synthetic = {f.oneof_index for f in msg.field if f.proto3_optional}
        for oi, oneof in enumerate(msg.oneof_decl):
            if oi not in synthetic:
                found.append((f"{name}.{oneof.name}", (*path, 8, oi), oneof))
        for ni, nested in enumerate(msg.nested_type):
            message(nested, (*path, 3, ni), f"{name}.")
        for ei, enum in enumerate(msg.enum_type):
            enum_type(enum, (*path, 4, ei), f"{name}.")

    def enum_type(
        enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str
    ) -> None:
        found.append((f"{prefix}{enum.name}", path, enum))
        for vi, value in enumerate(enum.value):
            found.append((f"{prefix}{enum.name}.{value.name}", (*path, 2, vi), value))

    for mi, msg in enumerate(file.message_type):
        message(msg, (4, mi), "")
    for ei, enum in enumerate(file.enum_type):
        enum_type(enum, (5, ei), "")
    return found


def test_every_service_rpc_message_field_and_enum_is_documented(
    source_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    undocumented = [
        f"{file.name}: {name}"
        for file in source_files
        for name, path, _ in elements(file)
        if path not in comments(file)
    ]
    assert not undocumented


NUMERIC = {
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
}


# A numeric field's comment gives a number (a range, a default) or names its unit.
UNIT = re.compile(
    r"\d|\b(seconds?|hz|hertz|bytes|fraction|number of|sequence number)\b", re.IGNORECASE
)


def test_numeric_fields_state_their_unit_or_range(
    source_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    vague = [
        name
        for file in source_files
        for name, path, element in elements(file)
        if isinstance(element, descriptor_pb2.FieldDescriptorProto)
        and element.type in NUMERIC
        and not UNIT.search(comments(file).get(path, ""))
    ]
    assert not vague, f"numeric fields whose comment gives no unit or range: {vague}"


def returned_status_codes() -> set[str]:
    """Every status code voicegate's own errors can return to a caller, plus gRPC's own."""

    def subclasses(cls: type[errors.VoicegateError]) -> set[type[errors.VoicegateError]]:
        found = {cls}
        for sub in cls.__subclasses__():
            found |= subclasses(sub)
        return found

    classes = subclasses(errors.VoicegateError) - NOT_RETURNED
    return {cls.status.value for cls in classes} | FROM_GRPC


# Any call can meet these: Triton or the store away, the caller's deadline, a bug.
EVERY_RPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"}


def test_every_rpc_documents_the_status_codes_it_returns(
    source_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    """The service comment explains every code voicegate returns; each RPC lists its own."""
    import grpc

    codes = returned_status_codes()
    assert {"INVALID_ARGUMENT", *EVERY_RPC} <= codes
    known = {code.name for code in grpc.StatusCode}
    rpcs = 0
    for file in source_files:
        documented = comments(file)
        for service_name, path, service in elements(file):
            if not isinstance(service, descriptor_pb2.ServiceDescriptorProto):
                continue
            explained = documented[path]
            missing = {c for c in codes if not re.search(rf"\b{c}\b", explained)}
            assert not missing, f"service {service_name} does not explain {sorted(missing)}"
            for mi, method in enumerate(service.method):
                rpcs += 1
                text = documented[(*path, 2, mi)]
                assert "Returns OK" in text, f"rpc {method.name}: no 'Returns OK, or ...'"
                named = {n for n in known if re.search(rf"\b{n}\b", text)}
                assert named >= EVERY_RPC, f"rpc {method.name} omits {EVERY_RPC - named}"
                unexplained = {n for n in named if not re.search(rf"\b{n}\b", explained)}
                assert not unexplained, f"rpc {method.name}: {unexplained} not on the service"
    assert rpcs >= 2


# --- the released API image -------------------------------------------------------------------


def released_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    image = descriptor_pb2.FileDescriptorSet.FromString(RELEASED.read_bytes())
    return {file.name: file for file in image.file}


def test_released_image_is_the_v1_api_without_comments() -> None:
    files = released_files()
    assert set(files) == {"voicegate/v1/audio.proto", "voicegate/v1/speaker.proto"}
    assert all(file.package == "voicegate.v1" for file in files.values())
    assert not any(file.HasField("source_code_info") for file in files.values())
    services = {s.name: s for s in files["voicegate/v1/speaker.proto"].service}
    assert {m.name for m in services["SpeakerService"].method} == {"Embed", "Verify"}


def test_current_api_keeps_every_released_field(
    source_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    """A wire-level check that needs no buf: every released field keeps number, type, label."""

    def fields(files: object) -> dict[tuple[str, str], tuple[int, int, int, str]]:
        return {
            (msg.name, f.name): (f.number, f.type, f.label, f.type_name)
            for file in files  # type: ignore[attr-defined]
            for msg in file.message_type
            for f in msg.field
        }

    current = fields(source_files)
    released = fields(released_files().values())
    changed = {
        key: (old, current.get(key)) for key, old in released.items() if current.get(key) != old
    }
    assert not changed


# --- stubs for other languages ------------------------------------------------------------------


def test_buf_generate_template_covers_go_java_and_python() -> None:
    template = yaml.safe_load((ROOT / "buf.gen.yaml").read_text())
    assert template["version"] == "v2"
    plugins = {p["remote"].split(":")[0]: p for p in template["plugins"]}
    assert {
        "buf.build/protocolbuffers/go",
        "buf.build/grpc/go",
        "buf.build/protocolbuffers/java",
        "buf.build/grpc/java",
        "buf.build/protocolbuffers/python",
        "buf.build/grpc/python",
    } <= set(plugins)
    assert all(":v" in p["remote"] for p in template["plugins"]), "pin plugin versions"
    outputs = {p["out"] for p in template["plugins"]}
    assert all(out.startswith("gen/") for out in outputs)
    for out in outputs:
        ignored = subprocess.run(["git", "check-ignore", "-q", out], cwd=ROOT, timeout=30)
        assert ignored.returncode == 0, f"generated stubs in {out} must be gitignored"


def test_readme_shows_how_to_generate_stubs_for_each_language() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Client stubs", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "buf generate",
        "protoc-gen-go-grpc",
        "protoc-gen-grpc-java",
        "@grpc/proto-loader",
        "grpc_tools.protoc",
        "examples/node/client.js",
    ):
        assert needle in section, needle


def test_node_lockfile_pins_what_package_json_asks_for() -> None:
    import json

    package = json.loads((NODE_DIR / "package.json").read_text())
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    wanted = {**package["dependencies"], **package["devDependencies"]}
    locked = {name: lock["packages"][f"node_modules/{name}"]["version"] for name in wanted}
    assert locked == wanted  # exact pins, so `npm ci` installs what the Makefile expects
    # buf's platform binaries, for every OS a developer or CI may use
    buf_platforms = [
        key for key in lock["packages"] if key.startswith("node_modules/@bufbuild/buf-")
    ]
    assert len(buf_platforms) >= 6
