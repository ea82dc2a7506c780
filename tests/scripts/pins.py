"""The three tested dependency sets: constraints.txt (what `make test` installs), the newest releases
(`make test-latest`) and pyproject's lower bounds (`make test-oldest`).

    python tests/scripts/pins.py oldest [--except torch]   # pyproject's lower bounds (and [dev]) as `name==X` lines
    python tests/scripts/pins.py drift VENV_PYTHON         # how VENV_PYTHON's packages differ from constraints.txt
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ("dev",)  # what the suite needs; flash is GPU-only, bench only draws plots
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bounds(skip: set[str]) -> list[str]:
    """`name==X` for every `name>=X` in pyproject's dependencies and EXTRAS; a requirement without one is an error."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for requirement in requirements:
        name, spec = _REQ.match(requirement).groups()
        if _canonical(name) in skip:
            continue
        lower = re.search(r">=\s*([^,;\s]+)", spec)
        if lower is None:
            raise SystemExit(f"pins.py: {requirement!r} in pyproject.toml has no lower bound to test")
        pins.append(f"{name}=={lower.group(1)}")
    return pins


def _versions(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        name, sep, version = line.strip().partition("==")
        if sep and not name.startswith("#"):
            found[_canonical(name)] = version.split("+")[0]  # torch's local label (+cpu) is no drift
    return found


def drift(python: str) -> int:
    """Print each package whose version differs from constraints.txt (or is new / gone); the count of them."""
    pinned = _versions((ROOT / "constraints.txt").read_text().splitlines())
    frozen = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    installed = _versions(frozen.splitlines())
    rows = [
        (name, pinned.get(name, "-"), installed.get(name, "-"))
        for name in sorted(pinned.keys() | installed.keys())
        if pinned.get(name) != installed.get(name)
    ]
    print(f"{len(rows)} packages differ from constraints.txt" + (":" if rows else ""))
    for name, old, new in rows:
        print(f"  {name:<24} {old:>14} -> {new}")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    oldest = sub.add_parser("oldest", help="pyproject's lower bounds as == constraints")
    oldest.add_argument("--except", dest="skip", action="append", default=[], help="leave this package out")
    sub.add_parser("drift", help="versions that differ from constraints.txt").add_argument("python")
    args = parser.parse_args()
    if args.command == "oldest":
        print("\n".join(lower_bounds({_canonical(s) for s in args.skip})))
    else:
        drift(args.python)


if __name__ == "__main__":
    sys.exit(main())
