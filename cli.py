"""Small argparse helpers the command lines share (benchmark.py, generate.py): integer flags with a
lower bound, and --help that shows defaults and keeps example commands as written."""

import argparse


def int_at_least(low: int):
    """An argparse `type` for an integer flag >= low, so a bad value is refused at parse time with
    the flag's name ("argument --limit: must be an integer >= 1, got '0'"), before anything loads."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default (not the empty ones: "(default: None)" says nothing) and
    keeps the example commands of the epilog as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)
