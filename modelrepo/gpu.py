"""Which NVIDIA GPU is here, through the CUDA driver (ctypes, no CUDA Python, no torch): a TensorRT engine runs
only on the compute capability it was built for, so export records it and the server compares."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass

CU_COMPUTE_CAPABILITY_MAJOR, CU_COMPUTE_CAPABILITY_MINOR = 75, 76  # CUdevice_attribute values
_int_p = ctypes.POINTER(ctypes.c_int)
_SIGNATURES = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGetCount": [_int_p],
    "cuDeviceGet": [_int_p, ctypes.c_int],
    "cuDeviceGetName": [ctypes.c_char_p, ctypes.c_int, ctypes.c_int],
    "cuDeviceGetAttribute": [_int_p, ctypes.c_int, ctypes.c_int],
}


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: str  # "9.0"


def libcuda(signatures: Mapping[str, list] | None = None) -> ctypes.CDLL | None:
    """The driver library with the probe's signatures (and the caller's `signatures`: function -> argtypes) set,
    or None where no NVIDIA driver is installed."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    for name, argtypes in {**_SIGNATURES, **(signatures or {})}.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    return lib


def find_gpu(ordinal: int = 0) -> Gpu | None:
    """GPU `ordinal`, or None without a driver or a device."""
    lib = libcuda()
    count, device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib is None or lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    if count.value <= ordinal or lib.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, len(name), device)
    lib.cuDeviceGetAttribute(ctypes.byref(major), CU_COMPUTE_CAPABILITY_MAJOR, device)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), CU_COMPUTE_CAPABILITY_MINOR, device)
    return Gpu(name.value.decode(errors="replace"), f"{major.value}.{minor.value}")
