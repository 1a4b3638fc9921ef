"""The man page is generated from the code; it must be regenerated when the code changes."""
import os

from tcptrace import manpage

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "tcptrace.8.md")


def test_manpage_is_current():
    with open(DOC) as f:
        current = f.read()
    assert current == manpage.render(), "run: make docs"


def test_manpage_documents_every_option_and_record_type():
    text = manpage.render()
    from tcptrace.cli import main
    for cmd in main.commands.values():
        for p in cmd.params:
            for o in getattr(p, "opts", []):
                if o.startswith("-"):
                    assert f"`{o}`" in text
    for t in ("connect", "accept", "refused", "failed", "reset", "close", "stuck", "unstuck",
              "transition", "lost"):
        assert f"**{t}**" in text
    for section in ("# SYNOPSIS", "# REQUIREMENTS", "# EXAMPLES", "# FIELDS", "# EXIT STATUS",
                    "# OVERHEAD", "# SEE ALSO"):
        assert section in text
