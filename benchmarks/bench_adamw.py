"""AdamW steps (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2): every fusedopt backend usable on the
device against torch.optim AdamW (for-loop, foreach, fused; with bf16-master also "torch fused +master (fp32
grads)"), apex FusedAdam (CUDA) and DeepSpeed FusedAdam (CUDA) / DeepSpeedCPUAdam (CPU) when they import, and
the in-place bandwidth stream with AdamW's reads and writes (28 B/param for the bare step).

The same as `python -m fusedopt.bench --rules adamw ...`: every other flag of `python -m fusedopt.bench --help`
applies (models, dtypes, scenarios, device, --out):

    python benchmarks/bench_adamw.py --quick --models gpt2-small --scenarios step
"""

import sys

from fusedopt.bench import main

if __name__ == "__main__":
    sys.exit(main(["--rules", "adamw", *sys.argv[1:]]))
