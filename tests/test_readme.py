"""Every Python example in the README runs, in order, in one namespace."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    bal = namespace["bal"]
    assert bal.weights.sum().item() == pytest_approx(3.0)
    assert (bal.weights > 0).all()


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5)


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    test_cmd = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[1].strip()
    assert test_cmd in ci
    assert "constraints.txt" in test_cmd and "pytest" in test_cmd
