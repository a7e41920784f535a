"""manifest.json: what one model folder (one depth of one model, on one platform) holds and how far it was checked.

`srvit export` builds a `Manifest` and `dump`s it; `srvit serve` `load`s it and never reads the JSON itself.
The key order of `to_dict` is the table's order in docs/model_repo.md. `load(dump(m)) == m`, and every
manifest exported since the format began loads unchanged (tests/modelrepo/test_manifest.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelrepo.adaptive import AdaptivePolicy

FORMAT = "srvit-manifest/2"  # /2 added flops, calibration and the adaptive policy
FORMATS = ("srvit-manifest/1", FORMAT)  # what loads: a /1 manifest serves every depth but `adaptive`
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.pbtxt"  # Triton's model config
LABELS_FILE = "labels.txt"  # one label per line: config.pbtxt's label_filename
ONNX, TENSORRT = "onnxruntime_onnx", "tensorrt_plan"
PLATFORMS = (ONNX, TENSORRT)  # in order of preference as the reference: ONNX first
MODEL_FILES = {ONNX: "model.onnx", TENSORRT: "model.plan"}
ENGINE_SUFFIX = "_trt"  # the TensorRT folder of a depth: `<name>_d<depth>_trt`
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a folder, a Triton model, a URL segment and a metric label
CHANNELS = ("L", "RGB")
INTERPOLATIONS = ("bilinear",)
REQUIRED = ("name", "version", "depth", "max_depth", "platform", "model_file", "max_batch_size", "input", "output",
            "labels", "preprocessing", "files")  # fmt: skip


class ManifestError(ValueError):
    """A manifest that breaks the contract; the message lists every problem found."""


class BadFileEntry(ManifestError):
    """One entry of `files` is not {"sha256", "size_bytes"}; `path` is the file it names, relative to the folder."""

    def __init__(self, path: str):
        super().__init__(f"{path}: its manifest entry must be {{'size_bytes', 'sha256'}}")
        self.path = path


def folder_name(name: str, depth: int, platform: str = ONNX) -> str:
    """The Triton model folder of one depth of `name` on `platform`, e.g. `srvit_fashion_d2` or `..._d2_trt`."""
    return f"{name}_d{depth}" + (ENGINE_SUFFIX if platform == TENSORRT else "")


def folder_pattern(name: str) -> re.Pattern[str]:
    """Matches every folder `folder_name` can give for `name`, and nothing else."""
    return re.compile(rf"{re.escape(name)}_d[0-9]+({re.escape(ENGINE_SUFFIX)})?")


def model_file(version: int, platform: str) -> str:
    """The graph or engine's path inside its folder: `<version>/model.onnx` as Triton expects it."""
    return f"{version}/{MODEL_FILES[platform]}"


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of the graph; -1 in `shape` is the batch."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, raw: Mapping) -> TensorSpec:
        return cls(raw["name"], raw["datatype"], tuple(raw["shape"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Preprocessing:
    """Encoded image -> input tensor: shorter side resized to `resize_size` (bilinear), center crop of
    `input_size`, converted to `channels` ("L" or "RGB"), scaled to [0, 1], normalized per channel."""

    input_size: int
    channels: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_size: int
    interpolation: str = "bilinear"

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ManifestError("preprocessing: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What a server following this exactly could not do: checked on construction, so an exporter cannot
        write what the server would refuse."""
        checks = [
            (self.channels in CHANNELS, f"channels must be 'L' or 'RGB', got {self.channels!r}"),
            (len(self.mean) == len(self.std) == len(self.channels),
             f"mean/std need {len(self.channels)} values for channels {self.channels!r}"),
            (all(s != 0 for s in self.std), "std must not contain 0"),
            (self.interpolation in INTERPOLATIONS, f"interpolation {self.interpolation!r} is not supported "
             f"(only {', '.join(INTERPOLATIONS)})"),
            (0 < self.input_size <= self.resize_size,
             f"need 0 < input_size ({self.input_size}) <= resize_size ({self.resize_size})"),
        ]  # fmt: skip
        return [message for ok, message in checks if not ok]

    @property
    def shape(self) -> tuple[int, int, int]:
        """[C, H, W] of every tensor it makes."""
        return (len(self.channels), self.input_size, self.input_size)

    @classmethod
    def from_dict(cls, raw: Mapping) -> Preprocessing:
        """Raises ManifestError for a missing key, a value of the wrong type, or a transform no server follows."""
        try:
            values = {
                "input_size": _int(raw["input_size"]),
                "channels": _str(raw["channels"]),
                "mean": tuple(map(_number, raw["mean"])),
                "std": tuple(map(_number, raw["std"])),
                "resize_size": _int(raw["resize_size"]),
                "interpolation": _str(raw.get("interpolation", "bilinear")),
            }
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"preprocessing: {_describe(e)}") from e
        return cls(**values)

    def to_dict(self) -> dict:
        fields = {"input_size": self.input_size, "channels": self.channels, "mean": list(self.mean),
                  "std": list(self.std), "resize_size": self.resize_size}  # fmt: skip
        return fields | {"interpolation": self.interpolation}


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size_bytes: int

    @classmethod
    def from_dict(cls, path: str, raw: Any) -> FileEntry:
        ok = isinstance(raw, dict) and isinstance(raw.get("sha256"), str) and _is_int(raw.get("size_bytes"))
        if not ok:
            raise BadFileEntry(path)
        return cls(raw["sha256"], raw["size_bytes"])

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class Manifest:
    """One model folder. The dict-valued fields are the exporter's records (the model config, the checkpoint's
    file and sha256, software versions, parity, accuracy, the TensorRT build): the server shows them, and
    compares `checkpoint["sha256"]` across depths, but decides nothing else by them."""

    name: str
    version: int
    depth: int
    max_depth: int
    platform: str
    model_file: str
    max_batch_size: int
    input: TensorSpec
    output: TensorSpec
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    files: Mapping[str, FileEntry]
    triton_name: str | None = None
    config: dict | None = None
    checkpoint: dict | None = None
    opset: int | None = None
    versions: dict | None = None
    parity: dict | None = None
    accuracy: dict | None = None  # {"top1", "images", "split"}, or None when no held-out data was measured
    tensorrt: dict | None = None  # {"version", "gpu", "compute_capability", "precision", "profile"}
    flops: int | None = None  # per image at this depth, counted on the model (format /2)
    calibration: dict | None = None  # {"temperature", "ece_before", "ece_after", ...} for this depth (format /2)
    adaptive: AdaptivePolicy | None = None  # the model's policy, equal in every depth (format /2)
    format: str = FORMAT
    extra: dict = field(default_factory=dict)  # keys a later exporter added: kept, so `dump` loses nothing

    # -- what the server asks of a manifest -------------------------------------------------------

    @property
    def chw(self) -> tuple[int, ...]:
        """The input shape of one image, without the batch: [C, H, W]."""
        return self.input.shape[1:]

    @property
    def checkpoint_sha256(self) -> str | None:
        sha256 = (self.checkpoint or {}).get("sha256")
        return sha256 if isinstance(sha256, str) else None

    @property
    def compute_capability(self) -> str | None:
        """The GPU architecture a TensorRT engine was built for."""
        return (self.tensorrt or {}).get("compute_capability")

    def shared(self) -> dict[str, Any]:
        """What every depth of one model must agree on: one export of one checkpoint."""
        return {"version": self.version, "max_depth": self.max_depth, "input": self.input, "output": self.output,
                "labels": self.labels, "preprocessing": self.preprocessing,
                "checkpoint": self.checkpoint_sha256, "adaptive": self.adaptive}  # fmt: skip

    # -- reading and writing ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        """The contract checked as the server relies on it; ManifestError lists what is wrong."""
        problems = _problems(raw)
        if problems:
            raise ManifestError("; ".join(problems))
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        adaptive = raw.get("adaptive")
        return cls(
            **{key: raw.get(key) for key in _OPTIONAL},
            adaptive=None if adaptive is None else AdaptivePolicy.from_dict(adaptive),
            format=raw["format"],
            **{
                key: raw[key]
                for key in ("name", "version", "depth", "max_depth", "platform", "model_file", "max_batch_size")
            },  # fmt: skip
            input=TensorSpec.from_dict(raw["input"]),
            output=TensorSpec.from_dict(raw["output"]),
            labels=tuple(raw["labels"]),
            preprocessing=Preprocessing.from_dict(raw["preprocessing"]),
            files={rel: FileEntry.from_dict(rel, entry) for rel, entry in raw["files"].items()},
            extra={key: value for key, value in raw.items() if key not in known},
        )

    def to_dict(self) -> dict:
        """In docs/model_repo.md's order, JSON-ready."""
        return {
            "format": self.format, "name": self.name, "triton_name": self.triton_name, "version": self.version,
            "depth": self.depth, "max_depth": self.max_depth, "platform": self.platform,
            "model_file": self.model_file, "max_batch_size": self.max_batch_size, "input": self.input.to_dict(),
            "output": self.output.to_dict(), "labels": list(self.labels),
            "preprocessing": self.preprocessing.to_dict(), "config": self.config, "checkpoint": self.checkpoint,
            "opset": self.opset, "versions": self.versions, "parity": self.parity, "accuracy": self.accuracy,
            **(self._format2() if self.format == FORMAT else {}),
            "files": {rel: entry.to_dict() for rel, entry in self.files.items()}, "tensorrt": self.tensorrt,
            **self.extra,
        }  # fmt: skip

    def _format2(self) -> dict:
        """The keys format /2 added; a /1 manifest dumps back without them, byte for byte."""
        adaptive = None if self.adaptive is None else self.adaptive.to_dict()
        return {"flops": self.flops, "calibration": self.calibration, "adaptive": adaptive}


_OPTIONAL = ("triton_name", "config", "checkpoint", "opset", "versions", "parity", "accuracy", "tensorrt", "flops",
             "calibration")  # fmt: skip
_RECORDS = ("config", "checkpoint", "versions", "parity", "accuracy", "tensorrt", "calibration")  # objects or null


def manifest_paths(repo: Path) -> list[Path]:
    """`<repo>/<folder>/manifest.json`, sorted, skipping dot-folders: the exporter stages unfinished work there."""
    return sorted(p for p in Path(repo).glob(f"*/{MANIFEST_FILE}") if not p.parent.name.startswith("."))


def load(path: Path) -> Manifest:
    """Raises OSError or ValueError (json.JSONDecodeError, ManifestError) with the problem in its message."""
    return Manifest.from_dict(json.loads(Path(path).read_text()))


def dump(manifest: Manifest, folder: Path) -> Path:
    """Write `<folder>/manifest.json`; last of a folder's files, since its checksums cover the others."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


# -- validation -----------------------------------------------------------------------------------


def _problems(m: Any) -> list[str]:
    if not isinstance(m, dict) or m.get("format") not in FORMATS:
        found = m.get("format") if isinstance(m, dict) else None
        return [f"not a srvit manifest of format srvit-manifest/1 or /2 (format {found!r})"]
    missing = [key for key in REQUIRED if key not in m]
    if missing:
        return [f"missing keys {missing}"]
    checks = [
        (isinstance(m["name"], str) and NAME_PATTERN.fullmatch(m["name"]), f"bad name {m['name']!r}"),
        (_positive_int(m["version"]), f"version {m['version']!r} is not a positive integer"),
        (_positive_int(m["max_depth"]) and _positive_int(m["depth"]) and m["depth"] <= m["max_depth"],
         f"depth {m['depth']!r} is not within 1..max_depth {m['max_depth']!r}"),
        (m["platform"] in PLATFORMS, f"platform {m['platform']!r} is not one of {PLATFORMS}"),
        (_positive_int(m["max_batch_size"]), f"max_batch_size {m['max_batch_size']!r} is not a positive integer"),
        (_signature_ok(m), "input/output must be FP32 [-1, C, H, W] / [-1, len(labels)]"),
        (isinstance(m["labels"], list) and all(isinstance(label, str) for label in m["labels"]),
         "labels must be a list of strings"),
        (isinstance(m["preprocessing"], dict), "preprocessing must be an object"),
        (all(m.get(key) is None or isinstance(m[key], dict) for key in _RECORDS),
         f"{', '.join(_RECORDS)} must each be an object or null"),
        (m.get("triton_name") is None or isinstance(m["triton_name"], str), "triton_name must be a string"),
        (m.get("flops") is None or _positive_int(m["flops"]), f"flops {m.get('flops')!r} is not a positive integer"),
        (isinstance(m["files"], dict), "files must map each relative path to {'sha256', 'size_bytes'}"),
        (isinstance(m["files"], dict) and m["model_file"] in m["files"],
         f"model_file {m['model_file']!r} has no checksum in 'files'"),
    ]  # fmt: skip
    problems = [message for ok, message in checks if not ok]
    if not problems:
        try:
            preprocessing = Preprocessing.from_dict(m["preprocessing"])
        except ManifestError as e:
            return [str(e)]
        if preprocessing.shape != tuple(m["input"]["shape"][1:]):
            problems.append(f"preprocessing makes {list(preprocessing.shape)} but the input is {m['input']['shape']}")
        problems += _adaptive_problems(m)
    return problems


def _adaptive_problems(m: dict) -> list[str]:
    if m.get("adaptive") is None:
        return []
    try:
        policy = AdaptivePolicy.from_dict(m["adaptive"])
    except ValueError as e:
        return [str(e)]
    if policy.depths[-1] > m["max_depth"]:
        return [f"the adaptive policy's depths {list(policy.depths)} go past max_depth {m['max_depth']}"]
    return []


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value) -> bool:
    return _is_int(value) and value >= 1


def _signature_ok(m: dict) -> bool:
    try:
        inp, out = m["input"], m["output"]
        ok_in = inp["datatype"] == "FP32" and len(inp["shape"]) == 4 and inp["shape"][0] == -1
        ok_in = ok_in and all(_positive_int(d) for d in inp["shape"][1:])
        ok_out = out["datatype"] == "FP32" and list(out["shape"]) == [-1, len(m["labels"])]
        return ok_in and ok_out and isinstance(inp["name"], str) and isinstance(out["name"], str)
    except (KeyError, TypeError):
        return False


def _int(value) -> int:
    if not _is_int(value):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _number(value) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def _str(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _describe(e: Exception) -> str:
    return f"missing key {e}" if isinstance(e, KeyError) else str(e)
