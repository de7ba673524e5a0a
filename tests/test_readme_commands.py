"""Every ``flowforce`` command shown in README.md parses: no renamed or removed option survives in
the documentation (the commands are parsed, not run; running them is what the other tests and
the benchmarks do). Lines written as syntax, with ``[--optional]`` brackets, are skipped."""
import re
import shlex
from pathlib import Path

import pytest

from openmm_flowforce.cli.main import build_parser

README = Path(__file__).parents[1] / "README.md"


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for command in re.split(r"\s*(?:&&|;|\|)\s*", line.split(" #")[0].strip()):
                if command.startswith("flowforce ") and "[--" not in command:
                    commands.append(command)
    return commands


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 30


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command, capsys):
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as stop:
        pytest.fail(f"README command does not parse (exit {stop.code}): {command}\n{capsys.readouterr().err}")
