"""MkDocs hook: pages made from their sources at every build, so they cannot drift: the CLI reference from
edgevpr's argparse parser (``docs/cli.md`` holds its marker) and the home page from the README (``docs/index.md``;
its links into ``docs/`` rewritten for the site)."""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"
README = "<!-- readme -->"


def _commands(parser: argparse.ArgumentParser, prefix: str):
    """(command line, its parser, its one-line help) for every command and subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub, helps.get(name, "")
                yield from _commands(sub, f"{prefix} {name}")


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("[", "\\[").replace("]", "\\]").replace("\n", " ")


def reference() -> str:
    """Markdown: per command its help, usage and a table of its options (flags, what they do and their default)."""
    import os

    from edgevpr.cli import build_parser

    os.environ["COLUMNS"] = "110"  # usage lines wrap the same on every machine
    out = []
    for line, parser, summary in _commands(build_parser(), "edgevpr"):
        out += [f"## `{line}`", "", _cell(summary), "", "```text", parser.format_usage().strip(), "```", ""]
        rows = [a for a in parser._actions if a.help != argparse.SUPPRESS and
                not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if rows:
            out += ["| option | what it does |", "|---|---|"]
            for a in rows:
                flag = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
                out.append(f"| {flag} | {_cell(a.help % vars(a) if '%(' in (a.help or '') else a.help)} |")
            out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' hook signature)
    if MARKER in markdown:
        return markdown.replace(MARKER, reference())
    if README in markdown:
        from pathlib import Path

        text = (Path(config["config_file_path"]).parent / "README.md").read_text()
        return text.replace("](docs/", "](").replace("](CHANGELOG.md)", "](changelog.md)")
    return markdown
