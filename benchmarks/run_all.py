"""`make bench`: the benchmarks under benchmarks/, each writing its results file (and plot) under benchmarks/results/.

On a machine with a GPU the attention benchmarks run there (--device defaults to cuda); comm_volume always counts
bytes on gloo; dropout_parity compares SP and plain loss curves with dropout on CPU (about a minute). memory.py is
run on its own (long sweeps): python benchmarks/memory.py --help.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script in ("attention_bench.py", "attention_efficiency.py", "comm_volume.py", "dropout_parity.py"):
    subprocess.run([sys.executable, str(HERE / script)], check=True)
