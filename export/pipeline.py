"""`srvit export`: checkpoint -> per-depth ONNX graphs (and TensorRT engines), checked, then published atomically."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors import SafetensorError
from torch.utils.flop_counter import FlopCounterMode

from export import parity as checks
from export.calibration import Calibration, calibrate
from export.errors import ExportError
from export.manifest import build_manifest, software_versions
from export.onnx_graph import check_graph, trace
from export.publish import publish, remove_stale, staging
from export.report import Steps, calibration_tables, summary_table
from export.samples import Samples, find_samples
from export.triton import config_pbtxt
from modelrepo.files import file_entries, sha256_file
from modelrepo.idx import FASHION_MNIST_DIR
from modelrepo.manifest import (
    CONFIG_FILE,
    LABELS_FILE,
    NAME_PATTERN,
    ONNX,
    TENSORRT,
    ManifestError,
    Preprocessing,
    folder_name,
    model_file,
)
from modelrepo.manifest import dump as dump_manifest
from srvit.checkpoint import load_checkpoint
from srvit.model import SRViT, SRViTConfig

PRECISIONS = ("fp32", "fp16")
MAX_ATOL = 1e-4  # the parity gate of ONNX Runtime vs PyTorch: --atol may tighten it, never loosen it
STEPS_PER_DEPTH, TRT_STEPS_PER_DEPTH = 4, 3
FIXED_STEPS = 3  # count FLOPs, calibrate, publish


@dataclass(frozen=True)
class Job:
    """Everything that stays fixed while the depths are exported."""

    name: str
    version: int
    max_batch: int
    precision: str
    atol: float
    repo: Path
    model: SRViT
    meta: dict
    checkpoint: dict  # {"file", "sha256"} for the manifest
    samples: Samples
    tensorrt: dict | None  # {"version", "gpu", "compute_capability"} when engines are built

    @property
    def chw(self) -> tuple[int, int, int]:
        c = self.model.cfg
        return c.in_chans, c.img_size, c.img_size


@dataclass(frozen=True)
class Folder:
    """One checked model folder, its manifest still to write: calibration needs every depth first."""

    path: Path
    depth: int
    platform: str
    parity: dict
    accuracy: dict | None
    tensorrt: dict | None = None


@dataclass(frozen=True)
class Heldout:
    """One depth's ONNX Runtime logits on the whole held-out split, and its labels, for calibration."""

    logits: np.ndarray
    labels: np.ndarray


def export_checkpoint(
    checkpoint: Path, name: str, repo: Path, version: int = 1, depths: list[int] | None = None,
    max_batch: int = 64, trt: bool = False, precision: str = "fp32", data: Path | None = FASHION_MNIST_DIR,
    parity_images: int = 256, atol: float = 1e-4, console: Console | None = None,
) -> list[dict]:  # fmt: skip
    """Export every requested depth into `repo`, or raise ExportError and publish nothing. On success, the
    model's folders this export did not produce that hold another checkpoint (other depths, or engines not
    rebuilt) are removed.

    Returns one row per published model folder: model, depth, platform, file, size_bytes,
    max_abs_diff, top1_agreement, accuracy (top-1 or None), seconds.
    """
    check_options(name, version, max_batch, precision, trt, parity_images, atol)
    tensorrt = _tensorrt().check_available() if trt else None  # before any work: fail in milliseconds
    checkpoint, repo = Path(checkpoint), Path(repo)
    model, meta = load_model(checkpoint)
    depths = check_depths(depths, model.cfg.max_depth)
    samples = find_samples(meta, model.cfg, data, parity_images)
    ckpt = {"file": checkpoint.name, "sha256": sha256_file(checkpoint)}
    job = Job(name, version, max_batch, precision, atol, repo, model, meta, ckpt, samples, tensorrt)
    total = FIXED_STEPS + len(depths) * (STEPS_PER_DEPTH + TRT_STEPS_PER_DEPTH * trt)
    with Steps(console, total) as steps, staging(repo, name) as stage:
        if samples.heldout is None:
            steps.note(f"[yellow]warning:[/] parity runs on {samples.source}; accuracy will not be measured")
        rows, folders, heldout = [], [], {}
        for depth in depths:
            depth_rows, depth_folders, heldout[depth] = export_depth(job, depth, stage, steps)
            rows, folders = rows + depth_rows, folders + depth_folders
        with steps.step(f"count FLOPs per image at depths {depths}"):
            flops = {depth: count_flops(model, depth, job.chw) for depth in depths}
        calibration = calibrate_depths(job, heldout, flops, steps)
        for folder in folders:
            write_folder(job, folder, flops[folder.depth], calibration)
        publish_all(job, stage, steps, len(rows))
    return rows


def count_flops(model: SRViT, depth: int, chw: tuple[int, int, int]) -> int:
    """FLOPs of one image at `depth` (matmuls and convolutions, 2 per multiply-add), as torch counts them."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *chw), depth)
    return int(counter.get_total_flops())


def calibrate_depths(job: Job, heldout: dict[int, Heldout | None], flops: dict[int, int],
                     steps: Steps) -> Calibration | None:  # fmt: skip
    """Temperatures and the adaptive policy from the held-out logits; None (no policy) without held-out data or
    with fewer than two depths."""
    if job.samples.heldout is None or len(heldout) < 2:
        steps.skip("calibrate: skipped (needs held-out data and at least two depths); no adaptive policy")
        return None
    first = next(iter(heldout.values()))
    with steps.step(f"calibrate and fit the adaptive policy on {job.samples.split}"):
        result = calibrate({d: h.logits for d, h in heldout.items()}, first.labels, flops, job.samples.split)
    for table in calibration_tables(result, flops):
        steps.note(table)
    if result.policy is None:
        steps.note("[yellow]warning:[/] no policy keeps top-1 within the tolerance; depth=adaptive will be refused")
    return result


def publish_all(job: Job, stage: Path, steps: Steps, folders: int) -> None:
    """Every checked folder into the repo, then the model's folders this export did not produce out of it."""
    with steps.step(f"publish {folders} model folder(s) into {job.repo}"):
        published = publish(stage, job.repo)
        removed = remove_stale(job.repo, job.name, {p.name for p in published}, job.checkpoint["sha256"])
    for folder in removed:
        steps.note(f"[yellow]removed[/] {folder}: a folder of {job.name} from an earlier export, not produced now")


def check_options(name, version, max_batch, precision, trt, parity_images, atol) -> None:
    """Reject a bad request before loading anything."""
    problems = [
        (not NAME_PATTERN.fullmatch(name), f"--name {name!r} must be letters, digits, '_' or '-' (it names folders)"),
        (version < 1, f"--version must be >= 1 (Triton version folders are 1, 2, ...), got {version}"),
        (max_batch < 1, f"--max-batch must be >= 1, got {max_batch}"),
        (precision not in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {precision!r}"),
        (precision != "fp32" and not trt, "--precision fp16 applies to TensorRT engines: add --trt or drop it"),
        (parity_images < 1, f"parity needs at least one image, got {parity_images}"),
        (not 0 <= atol <= MAX_ATOL, f"--atol may tighten the parity gate, not loosen it: 0..{MAX_ATOL}, got {atol}"),
    ]
    for bad, message in problems:
        if bad:
            raise ExportError(message)


def _tensorrt():
    """export.tensorrt only when asked for: TensorRT is an optional, GPU-only dependency."""
    from export import tensorrt

    return tensorrt


def load_model(checkpoint: Path) -> tuple[SRViT, dict]:
    """The model and its metadata; pickles are refused by srvit.checkpoint before anything reads them."""
    if not checkpoint.is_file():
        raise ExportError(f"{checkpoint}: no such checkpoint; pass the model.safetensors that `srvit train` wrote")
    try:
        model, meta = load_checkpoint(checkpoint)
    except (ValueError, KeyError, SafetensorError) as e:  # CheckpointError is a ValueError
        raise ExportError(f"cannot export {checkpoint}: {e}") from e
    check_metadata(meta, model.cfg, checkpoint)
    return model, meta


def check_metadata(meta: dict, cfg: SRViTConfig, checkpoint: Path) -> None:
    """The manifest copies labels and preprocessing: without them, or with a transform the server cannot follow,
    the server cannot decode or answer."""
    num_classes = cfg.num_classes
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != num_classes:
        raise ExportError(f"{checkpoint}: metadata needs 'labels' with {num_classes} entries, one per class")
    if any(not isinstance(label, str) or "\n" in label for label in labels):
        raise ExportError(f"{checkpoint}: labels must be single-line strings (labels.txt has one per line)")
    if not isinstance(meta.get("preprocessing"), dict):
        raise ExportError(f"{checkpoint}: metadata has no 'preprocessing'; re-save it with srvit.checkpoint")
    try:
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except ManifestError as e:
        raise ExportError(f"{checkpoint}: the server could not follow its {e}; re-save it with srvit.checkpoint") from e
    if preprocessing.shape != (cfg.in_chans, cfg.img_size, cfg.img_size):
        raise ExportError(f"{checkpoint}: its preprocessing makes {list(preprocessing.shape)} images but the model "
                          f"takes {[cfg.in_chans, cfg.img_size, cfg.img_size]}; fix the metadata")  # fmt: skip


def check_depths(depths: list[int] | None, max_depth: int) -> list[int]:
    depths = sorted(set(depths or range(1, max_depth + 1)))
    bad = [d for d in depths if not 1 <= d <= max_depth]
    if bad:
        raise ExportError(f"--depths {bad} out of range: this checkpoint's max_depth is {max_depth}")
    return depths


def export_depth(job: Job, depth: int, stage: Path, steps: Steps) -> tuple[list[dict], list[Folder], Heldout | None]:
    """One depth's ONNX model folder, checked step by step, and its TensorRT folder if asked for: their summary
    rows and folders (manifests not yet written), and the ONNX logits on held-out data when there is some."""
    t0 = time.perf_counter()
    folder = stage / folder_name(job.name, depth, ONNX)
    model_path = folder / model_file(job.version, ONNX)
    model_path.parent.mkdir(parents=True)
    with steps.step(f"d{depth}: trace ONNX (opset 18, dynamic batch)"):
        trace(job.model, depth, model_path)
    with steps.step(f"d{depth}: check graph (checker, no Loop/If, signature, no external data)"):
        check_graph(model_path, depth, job.chw, job.model.cfg.num_classes)
    run = checks.ort_runner(model_path)
    with steps.step(f"d{depth}: parity ONNX Runtime vs PyTorch on {len(job.samples.parity)} images"):
        ort_logits = checks.logits(run, job.samples.parity, job.max_batch)
        torch_logits = checks.logits(checks.torch_runner(job.model, depth), job.samples.parity, job.max_batch)
        result = checks.compare(ort_logits, torch_logits)
        checks.require(result, f"depth {depth}, ONNX Runtime vs PyTorch", job.atol, 1.0)
    with steps.step(f"d{depth}: top-1 accuracy with ONNX Runtime {_on(job.samples)}"):
        heldout = heldout_logits(run, job)
        accuracy = None if heldout is None else checks.top1(heldout.logits, heldout.labels, job.samples.split)
    folders = [Folder(folder, depth, ONNX, _parity(job, "pytorch", result, job.atol), accuracy)]
    rows = [_row(job, folder, depth, ONNX, result, accuracy, t0)]
    if job.tensorrt is not None:
        row, engine_folder = export_engine(job, depth, model_path, ort_logits, stage, steps)
        rows, folders = rows + [row], folders + [engine_folder]
    return rows, folders, heldout


def export_engine(job: Job, depth: int, onnx_path: Path, ort_logits, stage: Path, steps: Steps) -> tuple[dict, Folder]:
    """A TensorRT engine from the checked ONNX graph, held to ONNX Runtime's logits on the same images."""
    trt, t0 = _tensorrt(), time.perf_counter()
    folder = stage / folder_name(job.name, depth, TENSORRT)
    plan_path = folder / model_file(job.version, TENSORRT)
    plan_path.parent.mkdir(parents=True)
    with steps.step(f"d{depth}: build TensorRT engine ({job.precision}, batch 1..{job.max_batch})"):
        engine = trt.build_engine(onnx_path, plan_path, job.chw, job.max_batch, job.precision)
    with trt.runner(engine) as run:
        with steps.step(f"d{depth}: parity TensorRT vs ONNX Runtime"):
            result = checks.compare(checks.logits(run, job.samples.parity, job.max_batch), ort_logits)
            what = f"depth {depth}, TensorRT {job.precision} vs ONNX Runtime"
            checks.require(result, what, *trt.PARITY[job.precision])
        with steps.step(f"d{depth}: top-1 accuracy with TensorRT {_on(job.samples)}"):
            heldout = heldout_logits(run, job)
            accuracy = None if heldout is None else checks.top1(heldout.logits, heldout.labels, job.samples.split)
    engine_info = {**job.tensorrt, "precision": job.precision, "profile": trt.profile(job.max_batch)}
    parity = _parity(job, "onnxruntime", result, trt.PARITY[job.precision][0])
    folder_record = Folder(folder, depth, TENSORRT, parity, accuracy, engine_info)
    return _row(job, folder, depth, TENSORRT, result, accuracy, t0), folder_record


def heldout_logits(run: checks.Runner, job: Job) -> Heldout | None:
    if job.samples.heldout is None:
        return None
    return Heldout(*checks.heldout_logits(run, job.samples.heldout, job.max_batch))


def _on(samples: Samples) -> str:
    return f"on {samples.split}" if samples.heldout is not None else "skipped: no held-out data"


def write_folder(job: Job, f: Folder, flops: int, calibration: Calibration | None) -> None:
    """labels.txt, config.pbtxt and last the manifest, whose checksums cover the other files."""
    cfg, folder = job.model.cfg, f.path
    (folder / LABELS_FILE).write_text("".join(f"{label}\n" for label in job.meta["labels"]))
    (folder / CONFIG_FILE).write_text(config_pbtxt(folder.name, f.platform, job.max_batch, job.chw, cfg.num_classes))
    files = file_entries(folder, [CONFIG_FILE, LABELS_FILE, model_file(job.version, f.platform)])
    manifest = build_manifest(
        name=job.name, triton_name=folder.name, version=job.version, depth=f.depth, platform=f.platform,
        max_batch=job.max_batch, meta=job.meta, cfg=cfg, checkpoint=job.checkpoint,
        versions=software_versions(f.tensorrt and f.tensorrt["version"]), parity=f.parity, accuracy=f.accuracy,
        files=files, tensorrt=f.tensorrt, flops=flops,
        calibration=None if calibration is None else calibration.calibration[f.depth],
        adaptive=None if calibration is None else calibration.policy,
    )  # fmt: skip
    dump_manifest(manifest, folder)


def _parity(job: Job, reference: str, result: dict, atol: float | None) -> dict:
    samples = job.samples
    return {"reference": reference, "images": len(samples.parity), "source": samples.source, "atol": atol, **result}


def _row(job: Job, folder: Path, depth: int, platform: str, result: dict, accuracy: dict | None, t0: float) -> dict:
    relative = model_file(job.version, platform)
    return {
        "model": folder.name,
        "depth": depth,
        "platform": platform,
        "file": str(job.repo / folder.name / relative),
        "size_bytes": (folder / relative).stat().st_size,
        **result,
        "accuracy": None if accuracy is None else accuracy["top1"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `srvit export` options; the CLI wires them with `export.pipeline.main` as the handler."""
    parser.add_argument("checkpoint", type=Path, help="a .safetensors checkpoint written by `srvit train`")
    parser.add_argument("--name", required=True, help="logical model name, e.g. srvit_fashion (folders are NAME_dD)")
    parser.add_argument("--version", type=int, default=1, help="Triton version folder (default 1)")
    parser.add_argument("--depths", type=_int_list, default=None, help="comma-separated depths (default: all)")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch the graphs accept (default 64)")
    parser.add_argument("--trt", action="store_true", help="also build TensorRT engines (needs an NVIDIA GPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="TensorRT precision (default fp32)")
    parser.add_argument("--repo", type=Path, default=Path("model_repo"), help="model repository (default model_repo)")
    parser.add_argument("--data", type=Path, default=FASHION_MNIST_DIR, help="held-out data for parity and accuracy")
    parser.add_argument("--parity-images", type=int, default=256, help="images compared per depth (default 256)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest |Δlogit| ONNX Runtime may differ by")


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {text!r}") from None


def main(args: argparse.Namespace) -> int:
    """Run the export with a progress display and a summary table; 0 on success, 2 on an ExportError."""
    console = Console()
    try:
        rows = export_checkpoint(
            args.checkpoint, args.name, args.repo, version=args.version, depths=args.depths,
            max_batch=args.max_batch, trt=args.trt, precision=args.precision, data=args.data,
            parity_images=args.parity_images, atol=args.atol, console=console,
        )  # fmt: skip
    except ExportError as e:
        console.print(f"[bold red]export failed:[/] {e}")
        return 2
    console.print(summary_table(rows))
    return 0
