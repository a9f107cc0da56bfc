"""The README's quick start stays true: two commands, and CI runs the test command exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_is_two_commands_demo_then_tests():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].endswith("harness run --suite demo")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci


def test_readme_subcommands_exist():
    from harness.cli import COMMANDS

    text = (ROOT / "README.md").read_text()
    for name in re.findall(r"^harness (\w+)", text, re.M):
        assert name in COMMANDS, f"README mentions 'harness {name}', which is not a subcommand"


def test_the_architecture_section_names_every_room_of_the_engine():
    """The README's architecture table must match the tree: every module and package of harness/ is named."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Architecture"):]
    harness = ROOT / "harness"
    rooms = [p.name for p in harness.glob("*.py") if p.name != "__init__.py"]
    rooms += [f"{p.name}/" for p in harness.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    missing = [room for room in rooms if f"`{room}`" not in section]
    assert missing == []
    table = section[section.index("| module |"):section.index("**How a trial travels")]
    named = set(re.findall(r"`([a-z_]+(?:\.py|/))`", table))
    assert {n for n in named if n not in rooms} == set()  # nothing named that is not there
