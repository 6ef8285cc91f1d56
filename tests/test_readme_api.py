"""The README's Python API example runs as written (on the tiny random LLaMA instead of SmolLM2, with a short
training run), its edit changes the model and its undo puts every edited weight back bit for bit."""

import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str, scope: dict) -> None:
    exec(compile(code, "README.md", "exec"), scope)


def test_readme_python_api_runs_on_the_tiny_model(capsys):
    code = _readme_block()
    assert "model.name=smollm2-135m" in code and "train.n_batches=40" in code
    code = code.replace("model.name=smollm2-135m", "model.name=tiny-llama").replace("train.n_batches=40",
                                                                                   "train.n_batches=2")
    setup, rest = code.split("results, refused = ", 1)
    edit_line, rest = rest.split("\n", 1)
    undo_line, rest = rest.split("\n", 1)
    assert undo_line.startswith("session.editor.revert")
    scope: dict = {}
    _run(setup, scope)
    before = [m.module.weight.detach().clone() for m in scope["session"].modules]
    _run("results, refused = " + edit_line, scope)
    assert scope["results"] and not scope["refused"]
    after = [m.module.weight.detach().clone() for m in scope["session"].modules]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "the edit changed nothing"
    _run(undo_line, scope)
    for a, m in zip(before, scope["session"].modules):
        assert torch.equal(a, m.module.weight.detach())
    _run(rest, scope)
    assert "'es'" in capsys.readouterr().out
