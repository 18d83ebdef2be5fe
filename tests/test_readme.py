"""The README's code blocks run as written (offline, in a temporary working directory).

The rule for ```python blocks (also stated in the README, under "Add it to your Trainer"):

- every heading (``#``, ``##``, ``###`` ...) owns one namespace; the python blocks under it run in
  README order in that namespace, so a later block under the same heading sees the earlier ones' names;
- a heading's first block may start with ``# continues "<heading>"``: the heading's namespace then
  starts as a copy of the named heading's (which must come earlier), so the block goes on from that
  example (e.g. "In-flight logging" goes on from "Add it to your Trainer");
- otherwise a heading starts from an empty namespace. All blocks share one working directory (a
  temporary one holding a link to ``recipes/``), so files written by one block (``runs/tda.h5``) are
  there for the next.

```bash blocks: every ``lightning-tda ...`` line is parsed by the CLI's own parser (its flags must
exist); the runnable ones are run as written through :func:`lightning_tda.cli.main` in README order,
the others are listed in ``NOT_RUN`` with the reason. Other shell lines (``pip install``, ``pytest``)
are never run: they install the package or are this suite. A block that reads a recipe's store
(``runs/mislabel_tda.h5``) gets it from that recipe run at smoke size first (``PREPARE``).
"""

from __future__ import annotations

import os
import re
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from lightning_tda.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONTINUES = re.compile(r'^# continues "([^"]+)"')
NOT_RUN = {
    "lightning-tda demo": "runs in tests/test_cli_and_examples.py::test_demo_and_inspect_cli",
    "X.yaml": "a placeholder recipe name",
    "<recipe>": "a placeholder recipe name",
    "runs/tda.h5": "inspects a store the python blocks write; `inspect` runs in test_cli_and_examples",
}
PREPARE = {
    "runs/mislabel_tda.h5": [
        "fit", "--config", "recipes/classifier_mislabel.yaml", "--model.init_args.base",
        "tiny-bert", "--trainer.max_epochs", "1", "--data.init_args.n_val", "16",
        "--data.init_args.max_length", "24", "--trainer.enable_progress_bar", "false",
    ],
}  # fmt: skip
"""Blocks that read a recipe's store: the recipe run at smoke size that writes it (the block's own
arguments, e.g. ``n_train=512``, stay those of the recipe)."""


@dataclass
class Block:
    lang: str
    heading: str
    line: int  # 1-based line of the opening fence
    code: str


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block with the heading it sits under."""
    blocks, heading, fence = [], "", None
    for n, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("```"):
                fence, lines = (line[3:].strip(), n), []
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            blocks.append(Block(fence[0], heading, fence[1], "\n".join(lines) + "\n"))
            fence = None
        else:
            lines.append(line)
    assert fence is None, f"README.md:{fence[1]}: unclosed code block"
    return blocks


def cli_lines(code: str) -> list[str]:
    """The ``lightning-tda`` command lines of a bash block, comments dropped."""
    out = []
    for line in code.splitlines():
        line = line.split("  #")[0].strip()
        if line.startswith("lightning-tda "):
            out.append(line)
    return out


def skip_reason(line: str) -> str | None:
    return next((why for key, why in NOT_RUN.items() if key in line), None)


def check_parses(line: str) -> None:
    """The CLI's parser accepts the line's flags (``fit`` belongs to LightningCLI: a config file)."""
    argv = shlex.split(re.sub(r"\[[^\]]*\]", "", line))[1:]  # [optional] parts dropped
    if argv[0] == "fit":
        assert "--config" in argv, line
        return
    build_parser().parse_args([a.replace("X.yaml", "digits_tracin.yaml") for a in argv])


def test_readme_rule_parses_headings_and_continuations():
    blocks = readme_blocks('# A\n```python\nx = 1\n```\n## B\n```python\n# continues "A"\n```\n')
    assert [(b.lang, b.heading, b.line) for b in blocks] == [("python", "A", 2), ("python", "B", 6)]
    assert CONTINUES.match(blocks[1].code).group(1) == "A"
    assert cli_lines("lightning-tda demo   # comment\npip install x\n") == ["lightning-tda demo"]


def _run_python(block: Block, spaces: dict[str, dict]) -> None:
    ns = spaces.get(block.heading)
    if ns is None:
        m = CONTINUES.match(block.code)
        if m:
            assert m.group(1) in spaces, f"README.md:{block.line}: no heading {m.group(1)!r} above"
            ns = dict(spaces[m.group(1)])
        else:
            ns = {"__name__": "readme"}
        spaces[block.heading] = ns
    else:
        assert not CONTINUES.match(block.code), (
            f"README.md:{block.line}: only a heading's first block may continue another heading"
        )
    for path, argv in PREPARE.items():
        if path in block.code and not Path(path).exists():
            assert main(argv) == 0
    exec(compile(block.code, f"README.md:{block.line}", "exec"), ns)


def _run_all(blocks: list[Block], spaces: dict, ran: list, timings: list) -> None:
    for block in blocks:
        t0 = time.perf_counter()
        if block.lang == "python":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _run_python(block, spaces)
            ran.append(f"python README.md:{block.line}")
        elif block.lang == "bash":
            for line in cli_lines(block.code):
                check_parses(line)
                if skip_reason(line) is None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        assert main(shlex.split(line)[1:]) == 0, line
                    ran.append(f"bash README.md:{block.line}: {line}")
        timings.append((time.perf_counter() - t0, block.line))


@pytest.mark.slow  # ~35 s on 2 CPU cores
def test_readme_code_blocks_run_as_written(tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("wandb")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("LIGHTNING_TDA_PROGRESS", "0")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    blocks = readme_blocks(README.read_text(encoding="utf-8"))
    spaces: dict[str, dict] = {}
    ran, timings = [], []
    try:
        _run_all(blocks, spaces, ran, timings)
    finally:
        import wandb

        if wandb.run is not None:  # the W&B block's WandbLogger run
            wandb.run.finish()
    n_python = sum(b.lang == "python" for b in blocks)
    assert sum(r.startswith("python") for r in ran) == n_python >= 10
    # what the blocks promise exists afterwards
    assert Path("runs/tda.h5").exists() and Path("report.html").exists()
    assert Path("runs/digits_tda.h5").exists() and Path("lora.h5").exists()
    trainer_ns = spaces["Add it to your Trainer"]
    assert trainer_ns["res"].indices.shape == (8, 10)
    assert trainer_ns["dense"].shape == (8, 512)
    with capsys.disabled():
        slowest = ", ".join(f"README.md:{n} {s:.1f}s" for s, n in sorted(timings)[::-1][:5])
        print(f"\nREADME blocks: {len(ran)} run; slowest {slowest}")


def test_every_readme_cli_line_is_run_or_has_a_reason():
    lines = [
        ln
        for b in readme_blocks(README.read_text())
        if b.lang == "bash"
        for ln in cli_lines(b.code)
    ]
    assert lines
    for line in lines:
        check_parses(line)
    run = [ln for ln in lines if skip_reason(ln) is None]
    assert any(ln.startswith("lightning-tda report") for ln in run)
    assert os.path.exists(ROOT / "recipes" / "digits_tracin.yaml")
