"""The one-line error helpers."""

import pytest

from convforge.errors import first_line


@pytest.mark.parametrize(
    "error, line",
    [
        (ValueError("bad shape\n  at node 3\n"), "bad shape"),
        (ValueError("\n\n  indented first  \nsecond"), "indented first"),
        (ValueError(""), "ValueError"),  # an empty message: never an IndexError
        (RuntimeError("   \n  "), "RuntimeError"),
    ],
)
def test_first_line_is_the_first_non_empty_line_or_the_type(error, line):
    assert first_line(error) == line
