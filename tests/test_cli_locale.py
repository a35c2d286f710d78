"""Console scripts must not crash (and log files must stay UTF-8) under a plain-ASCII locale, as on some CI hosts."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ASCII_ENV = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}

SCRIPT = textwrap.dedent("""
    import sys
    from orthonet.cli_utils import run_cli
    from orthonet.logging_utils import get_logger

    @run_cli
    def main(argv):
        log = get_logger("locale_test", sys.argv[1])
        print("stdout encoding", sys.stdout.encoding)
        log.info("done \\u2026 Dice 0.91 \\u00b1 0.02")
        print("progress \\u2588\\u2588", file=sys.stderr)
        return 0

    sys.exit(main(None))
""")


def test_console_script_survives_an_ascii_locale(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONUTF8", "PYTHONIOENCODING"))}
    env.update(ASCII_ENV)
    log_file = tmp_path / "log.txt"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log_file)], env=env, capture_output=True)
    out, err = proc.stdout.decode("ascii"), proc.stderr.decode("ascii")   # an ASCII console gets only ASCII
    assert proc.returncode == 0, err
    assert "stdout encoding ascii" in out                                  # the locale really was ASCII
    assert "done \\u2026 Dice 0.91 \\xb1 0.02" in out and "\\u2588" in err
    assert "Logging error" not in err
    assert log_file.read_text(encoding="utf-8").rstrip().endswith("done \u2026 Dice 0.91 \u00b1 0.02")
