"""`make bench`: every benchmark under benchmarks/, each writing its results file under benchmarks/results/."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script in ("attention_bench.py",):
    subprocess.run([sys.executable, str(HERE / script), *sys.argv[1:]], check=True)
