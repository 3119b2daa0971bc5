"""lathe vs torchtitan in ONE process (run it with the torchtitan environment's python): both models are
built by bench/vs_torchtitan.py's builders and stepped alternately, so process-level differences
(allocator state, imports) cannot favour either side.

    PYTHONPATH=. ~/tt-venv/bin/python bench/vs_torchtitan_inproc.py lathe tt lathe+fused_qkv=true

Variants: tt, lathe, lathe+KEY=VALUE+... (lathe ModelArgs fields). Env: SHAPE (seed|head), N (measured
rounds), B (batch), AC, DTYPE (float32|bfloat16), THREADS, FTZ (flush denormals), CPU_ALLOCATOR (system,
the default here, or retain: lathe's training.cpu_allocator, applied to the whole process, so to both
models). Printed, never asserted."""
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch, torch.nn.functional as F
from torch import nn
spec = importlib.util.spec_from_file_location("vt", Path(__file__).with_name("vs_torchtitan.py"))
vt = importlib.util.module_from_spec(spec); spec.loader.exec_module(vt)
shape = dict(vt.SHAPES[os.environ.get("SHAPE", "seed")])
shape["batch"] = int(os.environ.get("B", shape["batch"]))
if "AC" in os.environ: shape["ac"] = os.environ["AC"]
N = int(os.environ.get("N", 6))
dtype = os.environ.get("DTYPE", "float32")
if os.environ.get("FTZ"): torch.set_flush_denormal(True)
torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
if os.environ.get("CPU_ALLOCATOR", "system") == "retain":
    sys.path.insert(0, str(vt.ROOT))
    from lathe import host_memory
    if host_memory.retain_freed_memory() is not None:
        sys.exit("CPU_ALLOCATOR=retain: not available here")
runs = {}
for v in sys.argv[1:]:
    torch.manual_seed(0)
    if v == "tt":
        m = vt.build_torchtitan(shape)
    else:
        extra = v.split("+")[1:]
        m = vt.build_lathe(shape, extra)
    params = [p for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=8e-4, foreach=True)
    runs[v] = (m, params, opt)
gen = torch.Generator().manual_seed(0)
ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
def step(v):
    m, params, opt = runs[v]
    tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1), generator=gen)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with ac:
        logits = m(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(0, 1)); del logits
    loss.backward(); nn.utils.clip_grad_norm_(params, 1.0, foreach=True); opt.step()
    return time.perf_counter() - t0
times = {v: [] for v in runs}
names = list(runs)
for k in range(N + 1):
    order = names if k % 2 == 0 else names[::-1]
    for v in order:
        t = step(v)
        if k: times[v].append(t)
    print(k, {v: round(times[v][-1], 3) for v in names} if k else "warm", flush=True)
base = statistics.median(times[names[0]])
for v in names:
    med = statistics.median(times[v])
    print(f"{v:40s} median {med:.3f}s  tokens/s {shape['batch']*shape['seq']/med:8.0f}  {names[0]}/this {base/med:.3f}")
