"""A server's /metrics read back: the batches it formed between two scrapes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

BATCH_SIZE_METRIC = "srvit_batch_size_images"  # histogram of formed batches, labels model and depth


def batch_histogram(metrics_text: str, model: str, depth: int | str) -> tuple[float, float]:
    """(sum, count) of the formed-batch-size histogram for one (model, depth), 0 before any batch ran; for
    "auto" or "adaptive", summed over every depth (their batches run at several)."""
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != BATCH_SIZE_METRIC:
            continue
        for sample in family.samples:
            wanted = not str(depth).isdigit() or sample.labels.get("depth") == str(depth)
            if sample.labels.get("model") == model and wanted:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return total, count


def mean_batch(before: str, after: str, model: str, depth: int | str) -> float | None:
    """Mean images per batch formed between two /metrics scrapes."""
    (s0, c0), (s1, c1) = batch_histogram(before, model, depth), batch_histogram(after, model, depth)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else None
