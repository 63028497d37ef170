"""The docs' command blocks marked runnable still run: each ``fedward run`` line of a fenced block
after a ``<!-- runnable -->`` line is run through the CLI, scaled down to a tiny budget."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fedward.cli import build_parser, main
from fedward.config import all_setting_names, applicable_settings

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- runnable -->"
# Appended to every command (where the setting applies to its method and data set): later flags win.
SCALED_DOWN = dict(comm_round=1, epochs=1, data_scale=0.03, patients_scale=0.3, image_size=16, batch_size=16,
                   eval_batch_size=128, model="smallcnn", client_models="smallcnn,resnet5,smallcnn,resnet5",
                   stem="small", messenger_dim=16, injection_epochs=1, distillation_epochs=1, public_size=64,
                   fedmd_public_subset=32, fedmd_public_epochs=1, head_epochs=1, ditto_personal_epochs=1,
                   pfeddf_finetune_epochs=1, feddf_server_steps=5, threads=1, progress=False)


def runnable_commands() -> list[tuple[str, str]]:
    """(where, command) for every ``fedward`` line of every marked block, continuations joined and
    comments dropped."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for match in re.finditer(re.escape(MARK) + r"\s*\n```[a-z]*\n(.*?)```", text, flags=re.S):
            line_no = text[:match.start()].count("\n") + 1
            joined = re.sub(r"\\\n\s*", " ", match.group(1))
            for line in joined.splitlines():
                command = line.split("  #")[0].strip()
                if command.startswith("fedward "):
                    found.append((f"{page.relative_to(ROOT)}:{line_no}", command))
    return found


def test_the_docs_mark_runnable_blocks():
    where = {w.split(":")[0] for w, _ in runnable_commands()}
    assert {"README.md", "docs/methods.md"} <= where


def scaled_down(argv: list[str], output: Path) -> list[str]:
    args = build_parser(argv).parse_known_args(argv)[0]
    given = {k: v for k, v in vars(args).items() if k in all_setting_names()}
    extra = applicable_settings({**given, **SCALED_DOWN})
    extra = {k: v for k, v in extra.items() if k in SCALED_DOWN}
    flags = [f"--{k}={v}" for k, v in extra.items()]
    return [*argv, *flags, "--output", str(output)]


@pytest.mark.parametrize("where, command", runnable_commands(), ids=[w for w, _ in runnable_commands()])
def test_a_runnable_command_runs(where, command, tmp_path, capsys):
    argv = shlex.split(command)[1:]
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0 and "usage: fedward" in capsys.readouterr().out
        return
    assert argv[0] == "run", f"{where}: only `fedward run` and `--help` lines can be marked runnable"
    assert main(scaled_down(argv, tmp_path / "run")) == 0, f"{where}: {command}"
    assert (tmp_path / "run" / "results.json").is_file()


def test_every_relative_link_of_the_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for match in re.finditer(r"\]\(([^)#\s]+)(#[^)]*)?\)", page.read_text(encoding="utf-8")):
            target = match.group(1)
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken
