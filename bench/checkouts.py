"""Old against new: run the same timing script in two checkouts, each importing its own torchdkm.

``bench.engine_compare`` and ``bench.llm_step`` alternate the checkouts turn by
turn (the machine's load drifts); each turn is a fresh interpreter started in
the checkout, which prints its result as JSON on its last line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_in(checkout: Path, script: str, args: Any) -> Any:
    """Run ``script`` (``python -c``) in ``checkout`` with ``args`` as its JSON argument; its last line, parsed."""
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], cwd=checkout, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def git_head(checkout: Path) -> str:
    """The checkout's short commit hash."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
