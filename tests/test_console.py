from convforge.console import format_table


def test_numbers_align_right_text_left():
    text = format_table(["name", "n"], [["a", 1], ["bbb", 1234567], ["c", 0.5]])
    lines = text.splitlines()
    assert lines[0] == "name          n"
    assert lines[2] == "a             1"
    assert lines[3] == "bbb   1,234,567"
    assert lines[4] == "c           0.5"
