"""How tokenrelay starts its own processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tokenrelay.commands import tokenrelay_argv


def test_children_ignore_a_tokenrelay_folder_in_the_working_directory(tmp_path: Path) -> None:
    """Regression: `tokenrelay serve` run from a checkout after a plain `pip install .` started
    its API and worker with `python -m tokenrelay`, which imported the checkout's own
    tokenrelay/ folder (no api/ or workers/ inside) and died with "No module named
    'tokenrelay.api'". Children now start with -P; a decoy package stands in for the folder."""
    decoy = tmp_path / "tokenrelay"
    decoy.mkdir()
    (decoy / "__init__.py").write_text('raise SystemExit("decoy imported")\n')
    (decoy / "__main__.py").write_text("")
    plain = subprocess.run(
        [sys.executable, "-m", "tokenrelay", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert "decoy imported" in plain.stderr  # the trap is real
    ours = subprocess.run(
        tokenrelay_argv("--version"), cwd=tmp_path, capture_output=True, text=True
    )
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.startswith("tokenrelay ")
