"""`python -m fusedopt.bench`: time optimizer steps on parameter lists shaped like real models.

The full description (models, contenders, scenarios, dtypes, the bytes model, statistics) is ``--help``, the
docstring of cli.py. One job per module:

    models.py      parameter-list shapes (GPT-2 small / medium, ResNet-50, 10,000 small tensors)
    traffic.py     the bytes-per-parameter model and the in-place stream (the bandwidth reference)
    contenders.py  the contenders (fusedopt backends, torch.optim, lion-pytorch, apex, DeepSpeed, the stream)
    stats.py       quantiles, the per-contender summary, paired (per-round) ratios
    timing.py      one group timed in interleaved rounds, with warm-up, graph capture and a progress bar
    report.py      the headline, the CPU targets, console and Markdown tables, results.md and results.json
    cli.py         the command line and main()
"""

from fusedopt.bench.cli import main, parse_args
from fusedopt.bench.contenders import HYPER, all_contenders
from fusedopt.bench.models import MODEL_NAMES, model_shapes, numel_of
from fusedopt.bench.report import CPU_TARGETS, evaluate_targets, headline
from fusedopt.bench.timing import Options, run_group
from fusedopt.bench.traffic import DTYPES, RULES, SCENARIOS, bytes_model_table, bytes_per_param, make_stream

__all__ = ["main", "parse_args", "MODEL_NAMES", "model_shapes", "numel_of", "RULES", "DTYPES", "SCENARIOS",
           "bytes_per_param", "bytes_model_table", "make_stream", "HYPER", "all_contenders", "Options", "run_group",
           "headline", "evaluate_targets", "CPU_TARGETS"]
