import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def lina_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lina", *args]


def run_lina(*args: str, timeout: float = 240, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(lina_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd)


TINY_TOML = """
steps = 8
batch_size = 4
eval_every = 4
eval_batches = 1
corpus_max_mb = 0.5
[model]
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 64
seq_len = 32
[comm]
check_collectives = true
[output]
checkpoint_every = 4
log_every = 1
"""


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_TOML)
    return path


@pytest.fixture
def is_root() -> bool:
    return os.geteuid() == 0
