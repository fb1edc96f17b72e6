# Sourced on the GPU machine: puts the cuBLAS that PyTorch's wheels carry on the loader path
# (cudarc loads libcublas dynamically) and keeps NVLink multicast off.
cublas_dir="$(python3 - <<'PY' 2>/dev/null
import glob, os, site
for root in site.getsitepackages():
    for p in glob.glob(os.path.join(root, "nvidia", "**", "libcublas.so*"), recursive=True):
        print(os.path.dirname(p)); raise SystemExit
PY
)"
if [ -n "$cublas_dir" ]; then export LD_LIBRARY_PATH="$cublas_dir:${LD_LIBRARY_PATH:-}"; fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
