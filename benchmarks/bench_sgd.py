"""SGD steps (lr 1e-2, momentum 0.9, Nesterov, weight decay 1e-4): every fusedopt backend usable on the device
against torch.optim SGD (for-loop, foreach, fused) and apex FusedSGD (CUDA) when it imports, and the in-place
bandwidth stream with SGD-momentum's reads and writes (20 B/param for the bare step).

The same as `python -m fusedopt.bench --rules sgd ...`: every other flag of `python -m fusedopt.bench --help`
applies (models, dtypes, scenarios, device, --out):

    python benchmarks/bench_sgd.py --quick --models resnet50
"""

import sys

from fusedopt.bench import main

if __name__ == "__main__":
    sys.exit(main(["--rules", "sgd", *sys.argv[1:]]))
