"""The cross-check: Debian's `wrk` (a C load generator) on one cell per server, so that a Python client is never
the only thing measured. One image, sent again and again, in the wire format the server takes."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from bench.loadgen import Target, image_type

UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def run_wrk(target: Target, image: bytes, concurrency: int, duration_s: float, cpus: set[int] | None = None) -> dict:
    """`wrk --latency` with one thread and `concurrency` connections for `duration_s`, on `cpus` (taskset)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk (make bench-peers-venvs installs it)")
    headers, body = request_bytes(target, image)
    with tempfile.TemporaryDirectory(prefix="srvit-wrk-") as tmp:
        body_path, script = Path(tmp) / "body", Path(tmp) / "post.lua"
        body_path.write_bytes(body)
        script.write_text(lua_script(headers, body_path))
        url = target.url.rstrip("/") + target.wire.path + _query(target.params)
        command = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", "--latency", "-s", str(script)]
        if cpus:
            command = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]
        out = subprocess.run([*command, url], capture_output=True, text=True, check=True, timeout=duration_s + 60)
    return parse_wrk(out.stdout)


def request_bytes(target: Target, image: bytes) -> tuple[dict[str, str], bytes]:
    """The request `bench.loadgen` sends for `image`, as literal headers and body (a multipart form encoded here)."""
    if target.wire.form_field and not target.wire.v2:
        boundary = uuid.uuid4().hex
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{target.wire.form_field}"; filename="image"'
                f"\r\nContent-Type: {image_type(image)}\r\n\r\n").encode()  # fmt: skip
        return {
            "Content-Type": f"multipart/form-data; boundary={boundary}"
        }, head + image + f"\r\n--{boundary}--\r\n".encode()
    headers, body = target.request(image)
    return headers, body


def lua_script(headers: dict[str, str], body_path: Path) -> str:
    lines = ['wrk.method = "POST"', f'local f = assert(io.open("{body_path}", "rb"))', "wrk.body = f:read('*a')",
             "f:close()"]  # fmt: skip
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    return "\n".join(lines) + "\n"


def _query(params: dict) -> str:
    return "?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""


def parse_wrk(text: str) -> dict:
    """Requests/s, the latency percentiles wrk prints (50, 75, 90, 99), non-2xx answers and socket errors."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if rate is None:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{text}")
    latency = {
        f"p{p}": float(v) * UNITS_MS[u] for p, v, u in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    requests = re.search(r"(\d+) requests in", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "requests_per_s": float(rate.group(1)),
        "requests": int(requests.group(1)) if requests else None,
        "latency_ms": latency,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
        "tool": "wrk -t1 --latency",
    }
