"""The model-repository contract that `srvit export` writes and `srvit serve` reads: torch-free, imported by both.

- `modelrepo.manifest`: the typed manifest (`Manifest`, `TensorSpec`, `Preprocessing`, `FileEntry`), its format
  string, folder and file names, `load` / `dump` and validation.
- `modelrepo.files`: `sha256_file` and the checksum entries a manifest lists.
- `modelrepo.gpu`: which NVIDIA GPU (and compute capability) is here, through the CUDA driver.
- `modelrepo.idx`: the IDX files (Fashion-MNIST) that training, export and the benchmarks read.
"""
