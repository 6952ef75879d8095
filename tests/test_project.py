"""The project's own promises: the README's commands are the ones CI runs, and the CLI is installed."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^pip install .*pytest.*$", readme, flags=re.M)
    assert len(commands) == 1, commands
    assert commands[0] in ci.splitlines()


def test_cli_help_lists_every_subcommand():
    from qv_jax.cli import COMMANDS

    out = subprocess.run([sys.executable, "-m", "qv_jax", "--help"], capture_output=True, text=True, check=True)
    for name in COMMANDS:
        assert name in out.stdout


def test_importing_qv_jax_does_not_import_jax():
    code = "import sys, qv_jax, qv_jax.errors; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
