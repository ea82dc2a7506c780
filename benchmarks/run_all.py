"""`make bench`: the benchmarks under benchmarks/, each writing its results file (and plot) under benchmarks/results/.

On a machine with a GPU the attention benchmarks run there (--device defaults to cuda); comm_volume and
tp_comm_volume (TP x SP, a training step) always count bytes on gloo; dropout_parity compares SP and plain loss curves
with dropout on CPU (about a minute). memory.py and tp_memory.py are run on their own (long sweeps): --help.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = ("attention_bench.py", "attention_efficiency.py", "comm_volume.py", "tp_comm_volume.py", "dropout_parity.py")
for script in SCRIPTS:
    subprocess.run([sys.executable, str(HERE / script)], check=True)
