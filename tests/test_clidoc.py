from pathlib import Path

from aqua_cli.clidoc import render


def test_cli_reference_is_current():
    """docs/cli.md is generated from the app: regenerate with `python -m aqua_cli.clidoc > docs/cli.md`."""
    committed = (Path(__file__).parent.parent / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render()


def test_every_command_is_documented():
    text = render()
    for name in ("calibrate", "inspect", "generate"):
        assert f"## `aqua {name}`" in text
