"""conversations/text.py: the one rule for text coming in, exact repairs and exact rejections."""

import io

import pytest

from conversations.text import MAX_MESSAGE_CHARS, TextError, clean_text, clean_turns, decode_line, read_lines


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("\ufeffhello", "hello"),  # a byte-order mark at the start
        ("  a\r\nb\rc  ", "a\nb\nc"),  # CRLF and CR become LF, ends stripped
        ("a\x00b\x07c\x1bd\x7fe\x85f", "a b c d e f"),  # NUL, C0, DEL and C1 become spaces
        ("tab\tand\nnewline", "tab\tand\nnewline"),  # kept
        ("café 😀 naïve", "café 😀 naïve"),
    ],
)
def test_repairs(raw, clean):
    assert clean_text(raw) == clean


@pytest.mark.parametrize(
    "raw, code, reason",
    [
        ("\ud800 hi", "surrogate", "the message holds a lone surrogate U+D800 at character 0"),
        ("ok \udfff", "surrogate", "the message holds a lone surrogate U+DFFF at character 3"),
        ("", "empty", "the message is empty"),
        ("\x00\x01 \ufeff", "empty", "the message is empty"),
        ("x" * 11, "too_long", "the message is 11 characters, over the 10-character limit"),
    ],
)
def test_rejections_name_the_problem_and_the_fix(raw, code, reason):
    with pytest.raises(TextError) as err:
        clean_text(raw, "the message", limit=10)
    assert err.value.code == code and err.value.reason.startswith(reason) and err.value.fix


def test_decode_line_strips_the_line_end_and_bom_and_reports_the_byte():
    assert decode_line(b"\xef\xbb\xbf{}\r\n") == "{}"
    with pytest.raises(TextError) as err:
        decode_line(b"caf\xe9\n")  # Latin-1
    assert err.value.code == "encoding" and err.value.reason == "invalid UTF-8 at byte 3"


def test_read_lines_cuts_a_long_line_without_reading_it_whole():
    data = b"short\n" + b"y" * 5000 + b"\nafter"
    assert [(raw[:5], size) for raw, size in read_lines(io.BytesIO(data), limit=100)] == [(b"short", 6), (b"yyyyy", 5001), (b"after", 5)]


def test_earlier_turns_drop_empty_ones_but_not_bad_ones():
    assert clean_turns(["hi", "\x00", " there "]) == ["hi", "there"]
    with pytest.raises(TextError):
        clean_turns(["\ud800"])
    assert MAX_MESSAGE_CHARS == 4000
