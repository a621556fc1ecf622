"""The README's examples marked `<!-- tested -->`, run as written against a live server with
the default model (only the address is pointed at the test server's port)."""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"<!-- tested -->\n```(sh|python)\n(.*?)```", re.S)


def examples():
    found = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(found) >= 6, "the README lost its tested examples"
    return found


@pytest.mark.parametrize("lang,code", examples(), ids=lambda v: v[:20] if len(v) > 6 else v)
def test_readme_example_runs_as_written(qwen_server, lang, code):
    code = code.replace("localhost:1234", qwen_server.removeprefix("http://"))
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    assert text, "an example that prints nothing"
    # Every example's answer is a real one: no error body, and text where text is expected.
    assert '"error"' not in text, text
    if "chat/completions" in code:
        assert '"finish_reason"' in text and '"content":"' in text.replace(": ", ":"), text
    if lang == "python":
        assert len(text.split()) >= 3, text
