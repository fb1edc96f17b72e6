"""The decode GEMV kernel (kvzip-kernels/csrc/gemv.cu) against its peer, torch's cuBLAS
matmul, in the same call: correctness against a float64 reference, then time per shape and
batch (1, 2 rows for ours; cuBLAS also at 4, 8 where it takes over), eagerly and replayed from
a CUDA graph, rotating >= 2 GB of weight copies so that L2 never holds them; then the whole set
of linear layers of a Llama-3.1-8B decode step (32 layers, distinct weights). Sweeps the
kernel's rows-per-warp / unroll. Writes $OUT/gemv.json.

Run on the GPU machine: python3 scripts/gpu/gemv/bench.py"""
import ctypes, json, os, subprocess, sys, time
import torch
import torch.nn.functional as F

out_dir = os.environ.get("OUT", "/tmp/out")
here = os.path.dirname(os.path.abspath(__file__))
csrc = os.path.join(here, "..", "..", "..", "kvzip-kernels", "csrc")
variants = [(r, u) for r in (1, 2, 4) for u in (2, 4, 8)]
libs = {}
for r, u in variants:
    so = f"/tmp/kvz_gemv_r{r}_u{u}.so"
    cmd = ["nvcc", "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17",
           "-gencode=arch=compute_90a,code=sm_90a", f"-DKVZ_GEMV_ROWS={r}", f"-DKVZ_GEMV_UNROLL={u}",
           "-I", csrc, "-o", so, os.path.join(here, "launch.cu"), "-Xptxas", "-v"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr); sys.exit(1)
    if r == 2 and u == 4:
        print("\n".join(l for l in res.stderr.splitlines() if "registers" in l or "spill" in l))
    lib = ctypes.CDLL(so)
    lib.proto_gemv.restype = ctypes.c_int
    libs[(r, u)] = lib

dev = torch.device("cuda")
torch.manual_seed(0)
stream = torch.cuda.current_stream()

def ours(lib, x, w, bias, out, m, n, k):
    rc = lib.proto_gemv(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w.data_ptr()),
                        ctypes.c_void_p(bias.data_ptr() if bias is not None else 0),
                        ctypes.c_void_p(out.data_ptr()), m, n, k, int(out.dtype == torch.float32),
                        ctypes.c_void_p(stream.cuda_stream))
    assert rc == 0, rc

def time_loop(fn, copies, reps):
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(reps):
        fn(i % copies)
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) / reps

def time_graph(fn, copies, reps):
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        global stream
        old = stream; stream = s
        fn(0); torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            for i in range(reps):
                fn(i % copies)
        stream = old
    torch.cuda.synchronize()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / reps)
    return sorted(ts)[2]

shapes = {
    "llama8b.qkv": (6144, 4096), "llama8b.o": (4096, 4096), "llama8b.gate_up": (28672, 4096),
    "llama8b.down": (4096, 14336), "llama8b.lm_head": (128256, 4096),
    "qwen7b.qkv": (4608, 3584), "qwen7b.down": (3584, 18944),
    "qwen05b.gate_up": (9728, 896), "qwen05b.down": (896, 4864),
}
results = {"variants": {}, "torch": {}, "errors": {}}
for name, (n, k) in shapes.items():
    nbytes = n * k * 2
    copies = max(2, -(-(2 << 30) // nbytes))
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.05 for _ in range(copies)]
    out_dtype = torch.float32 if "lm_head" in name else torch.bfloat16
    for m in (1, 2, 4, 8):
        run_ours = m <= 2
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16) if "qkv" in name else None
        ref = (x.double() @ ws[0].double().T + (bias.double() if bias is not None else 0))
        for (r, u), lib in libs.items():
            if not run_ours or (m > 1 and (r, u) not in [(1, 4), (2, 4), (2, 8), (4, 4)]):
                continue
            out = torch.full((m, n), float("nan"), device=dev, dtype=out_dtype)
            ours(lib, x, ws[0], bias, out, m, n, k)
            torch.cuda.synchronize()
            err = ((out.double() - ref).norm() / ref.norm()).item()
            results["errors"][f"{name}.m{m}.r{r}u{u}"] = err
            assert err < 1e-2 and not torch.isnan(out).any(), (name, m, r, u, err)
            reps = max(20, min(400, int(2e9 / nbytes)))
            t = time_loop(lambda i: ours(lib, x, ws[i], bias, out, m, n, k), copies, reps)
            tg = time_graph(lambda i: ours(lib, x, ws[i], bias, out, m, n, k), copies, reps)
            results["variants"][f"{name}.m{m}.r{r}u{u}"] = {"eager_us": t * 1e3, "graph_us": tg * 1e3,
                "eager_tbps": nbytes / t / 1e9, "graph_tbps": nbytes / tg / 1e9}
        outt = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
        def tl(i):
            torch.matmul(x, ws[i].T, out=outt)
            if bias is not None:
                outt.add_(bias)
        reps = max(20, min(400, int(2e9 / nbytes)))
        t = time_loop(tl, copies, reps)
        tg = time_graph(tl, copies, reps)
        results["torch"][f"{name}.m{m}"] = {"eager_us": t * 1e3, "graph_us": tg * 1e3,
            "eager_tbps": nbytes / t / 1e9, "graph_tbps": nbytes / tg / 1e9}
        line = f"{name:18s} m{m}: cuBLAS graph {tg*1e3:6.1f} us {nbytes/tg/1e9:5.2f} TB/s"
        if run_ours:
            r24 = results["variants"][f"{name}.m{m}.r2u4"]["graph_us"]
            best = min((v["graph_us"], k2) for k2, v in results["variants"].items() if k2.startswith(f"{name}.m{m}."))
            line += f" | ours r2u4 {r24:6.1f} us {nbytes/r24/1e6:5.2f} TB/s (best {best[1].rsplit('.', 1)[1]} {best[0]:.1f} us)"
        print(line, flush=True)
    del ws
    torch.cuda.empty_cache()

# A whole Llama-8B decode's linear layers (32 layers, distinct weights), m = 1.
L = 32
layer_shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
W = [[torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.05 for (n, k) in layer_shapes] for _ in range(L)]
total = sum(n * k * 2 for n, k in layer_shapes) * L
bufs = {n: torch.empty(1, n, device=dev, dtype=torch.bfloat16) for n, _ in layer_shapes}
xs = {k: torch.randn(1, k, device=dev, dtype=torch.bfloat16) for _, k in layer_shapes}
lib = libs[(2, 4)]
def seq_ours(_):
    for l in range(L):
        for j, (n, k) in enumerate(layer_shapes):
            ours(lib, xs[k], W[l][j], None, bufs[n], 1, n, k)
def seq_torch(_):
    for l in range(L):
        for j, (n, k) in enumerate(layer_shapes):
            torch.matmul(xs[k], W[l][j].T, out=bufs[n])
for nm, fn in (("ours_r2u4", seq_ours), ("torch", seq_torch)):
    t = time_loop(fn, 1, 10); tg = time_graph(fn, 1, 3)
    results[f"llama8b_all_layers_{nm}"] = {"eager_ms": t, "graph_ms": tg, "eager_tbps": total / t / 1e9, "graph_tbps": total / tg / 1e9}
    print(f"llama8b 32 layers {nm}: eager {t:.3f} ms ({total/t/1e9:.2f} TB/s), graph {tg:.3f} ms ({total/tg/1e9:.2f} TB/s)", flush=True)
os.makedirs(out_dir, exist_ok=True)
json.dump(results, open(os.path.join(out_dir, "gemv.json"), "w"), indent=1)
