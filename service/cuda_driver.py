"""The few CUDA driver calls a TensorRT engine needs (device memory, one stream, copies), through ctypes.

libcuda.so.1 comes with the NVIDIA driver, so serving an engine needs no CUDA Python package and no torch.
"""

from __future__ import annotations

import ctypes

import numpy as np

from modelrepo.gpu import libcuda

_ptr, _size, _handle = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p
_SIGNATURES = {  # beyond the device probe's own (modelrepo.gpu)
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(_handle), ctypes.c_int],
    "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
    "cuCtxSetCurrent": [_handle],
    "cuMemAlloc_v2": [ctypes.POINTER(_ptr), _size],
    "cuMemFree_v2": [_ptr],
    "cuMemcpyHtoDAsync_v2": [_ptr, _handle, _size, _handle],
    "cuMemcpyDtoHAsync_v2": [_handle, _ptr, _size, _handle],
    "cuStreamCreate": [ctypes.POINTER(_handle), ctypes.c_uint],
    "cuStreamSynchronize": [_handle],
    "cuStreamDestroy_v2": [_handle],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}


class CudaError(RuntimeError):
    pass


class CudaDevice:
    """The device's primary context (the one TensorRT's runtime API shares), made current per calling thread."""

    def __init__(self, ordinal: int = 0):
        self.lib = libcuda(_SIGNATURES)
        if self.lib is None:
            raise CudaError("libcuda.so.1 not found: the NVIDIA driver is not installed")
        self.device, self.context = ctypes.c_int(), _handle()
        self.check("cuInit", 0)
        self.check("cuDeviceGet", ctypes.byref(self.device), ordinal)
        self.check("cuDevicePrimaryCtxRetain", ctypes.byref(self.context), self.device)
        self.make_current()

    def check(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(text))
            raise CudaError(f"{name} failed: CUDA error {status} ({(text.value or b'?').decode()})")

    def make_current(self) -> None:
        """A CUDA context is current per thread; the device thread calls this before every batch."""
        self.check("cuCtxSetCurrent", self.context)

    def alloc(self, nbytes: int) -> int:
        ptr = _ptr()
        self.check("cuMemAlloc_v2", ctypes.byref(ptr), nbytes)
        return ptr.value

    def free(self, ptr: int) -> None:
        self.check("cuMemFree_v2", ptr)

    def stream(self) -> int:
        handle = _handle()
        self.check("cuStreamCreate", ctypes.byref(handle), 0)
        return handle.value

    def to_device(self, ptr: int, array: np.ndarray, stream: int) -> None:
        self.check("cuMemcpyHtoDAsync_v2", ptr, array.ctypes.data, array.nbytes, stream)

    def to_host(self, array: np.ndarray, ptr: int, stream: int) -> None:
        self.check("cuMemcpyDtoHAsync_v2", array.ctypes.data, ptr, array.nbytes, stream)

    def synchronize(self, stream: int) -> None:
        self.check("cuStreamSynchronize", stream)

    def destroy_stream(self, stream: int) -> None:
        self.check("cuStreamDestroy_v2", stream)

    def release(self) -> None:
        self.check("cuDevicePrimaryCtxRelease_v2", self.device)
