"""What a user reads before running anything: the licence the package declares, the install lines,
markdown that renders, and one figure per benchmark command."""

from __future__ import annotations

import re

from conftest import REPO


def test_the_declared_licence_ships_as_a_file():
    assert re.search(r'^license = "Apache-2.0"$', (REPO / "pyproject.toml").read_text(), re.M)
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and "9. Accepting Warranty or Additional Liability." in text
