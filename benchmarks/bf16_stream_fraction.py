"""Fraction of the in-place stream that a bf16 step without master weights reaches (issue 13), per build.

    python benchmarks/bf16_stream_fraction.py A.so[,B.so,...] THREADS ROUNDS [sgd,lion,adamw]

Each round runs one fresh subprocess per build (torch.ops.load_library of that .so), builds alternating: the bare
ops (sgd_ / lion_ / adamw_) on bfloat16 params, grads and states (no master copy) in GPT-2-shaped tensors (28.3M
elements), and in the same process an in-place stream of the same bytes over flat bf16 buffers, as the bench's
"bandwidth (stream)" (p.add_(g) plus m.mul_(1.0) per state). Per measurement: the fastest of 10 steps / streams,
timed alternately; printed: the median over rounds of step ms, stream ms and stream / step (the % of the stream).
"""
import json
import statistics
import subprocess
import sys

sos, threads, rounds = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
rules = sys.argv[4].split(",") if len(sys.argv) > 4 else ["sgd", "lion", "adamw"]
CHILD = r'''
import sys, time, torch, json
so, threads, rules = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
torch.set_num_threads(threads)
torch.ops.load_library(so); ops = torch.ops.fusedopt
unit = [768 * 3072, 3072 * 768, 768 * 768 * 4, 3072, 768, 768]
sizes = unit * 4  # 28.3M elements
g = torch.Generator().manual_seed(0)
N = sum(sizes)
bf = torch.bfloat16
ps = [torch.randn(n, generator=g).to(bf) for n in sizes]
gs = [(torch.randn(n, generator=g) * 1e-2).to(bf) for n in sizes]
m1 = [torch.zeros(n, dtype=bf) for n in sizes]
m2 = [torch.zeros(n, dtype=bf) for n in sizes]
steps = [torch.zeros((), dtype=torch.int64) for _ in sizes]
fp, fg, fa, fb = (torch.randn(N).to(bf) for _ in range(4))
calls = {
 "sgd": (lambda: ops.sgd_(ps, gs, m1, [], 1e-2, 0.9, 0.1, 1e-4, False, False, False, None, None, None, None, None, None), lambda: (fp.add_(fg), fa.mul_(1.0))),
 "lion": (lambda: ops.lion_(ps, gs, m1, [], 1e-4, 0.9, 0.99, 0.1, None, None, None, None, None, None), lambda: (fp.add_(fg), fa.mul_(1.0))),
 "adamw": (lambda: ops.adamw_(ps, gs, m1, m2, [], steps, [], 1e-3, 0.9, 0.999, 1e-8, 1e-2, False, False, None, None, None, None, None, None), lambda: (fp.add_(fg), fa.mul_(1.0), fb.mul_(1.0))),
}
out = {}
for r in rules:
    step, stream = calls[r]
    for f in (step, stream, step, stream): f()
    ts, tm = [], []
    for _ in range(10):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); stream(); tm.append(time.perf_counter() - t0)
    out[r] = (min(ts), min(tm))
print(json.dumps(out))
'''
res = {}
for r in range(rounds):
    for so in sos:
        o = subprocess.run([sys.executable, "-c", CHILD, so, str(threads), ",".join(rules)], capture_output=True, text=True)
        if o.returncode: print(o.stderr); sys.exit(1)
        d = json.loads(o.stdout.strip().splitlines()[-1])
        for k, (ts, tm) in d.items():
            res.setdefault((so, k), []).append((ts, tm))
for (so, k), v in res.items():
    pct = [tm / ts for ts, tm in v]
    print(f"{so.split('/')[-1]:>8} {k:6} step {statistics.median(t for t,_ in v)*1e3:7.2f} ms  stream {statistics.median(m for _,m in v)*1e3:7.2f} ms  %stream {100*statistics.median(pct):5.1f} (range {100*min(pct):.1f}-{100*max(pct):.1f})")
