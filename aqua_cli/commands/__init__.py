"""One module a command; importing it registers the command on ``aqua_cli.cli.app``."""
