"""retrieval/styles.py: each style's exact output, determinism per seed, and auto's cues."""

import pytest

from retrieval.styles import CLOSERS, OPENERS, apply_style, choose_style, sentences

TEXT = "Open Settings and choose Security. Tap Reset password. The emailed link works for 30 minutes."


def test_balanced_is_verbatim():
    assert apply_style(TEXT, "balanced") == (TEXT, "balanced")


def test_concise_keeps_the_first_sentence_or_a_short_lead_in_and_the_next():
    assert apply_style(TEXT, "concise") == ("Open Settings and choose Security.", "concise")
    assert apply_style("Sure. Run git reset --soft HEAD~1. It keeps your changes.", "concise") == (
        "Sure. Run git reset --soft HEAD~1.",
        "concise",
    )
    assert apply_style("One sentence only.", "concise") == ("One sentence only.", "concise")


def test_analyst_lays_the_sentences_out():
    assert apply_style(TEXT, "analyst") == (
        "Short answer: Open Settings and choose Security.\nDetails:\n1. Tap Reset password.\n2. The emailed link works for 30 minutes.",
        "analyst",
    )
    assert apply_style("Yes.", "analyst") == ("Short answer: Yes.", "analyst")


def test_creative_wraps_the_verbatim_text_deterministically_for_a_seed():
    out, style = apply_style(TEXT, "creative", creativity=1.0, seed=7)
    assert style == "creative" and TEXT in out
    opener, closer = out.split(TEXT)
    assert opener.strip() in OPENERS and closer.strip() in CLOSERS
    assert apply_style(TEXT, "creative", creativity=1.0, seed=7) == (out, "creative")
    assert apply_style(TEXT, "creative", creativity=0.0, seed=7) == (TEXT, "creative")
    assert len({apply_style(TEXT, "creative", creativity=1.0, seed=s)[0] for s in range(20)}) > 1


@pytest.mark.parametrize(
    "message, style",
    [
        ("tl;dr how do I reset it", "concise"),
        ("briefly, what is the fee?", "concise"),
        ("explain the fees step by step", "analyst"),
        ("why was my card declined", "analyst"),
        ("tell me something fun!!", "creative"),
        ("where is my parcel?", "balanced"),
    ],
)
def test_auto_picks_from_cues(message, style):
    assert choose_style(message) == style
    assert apply_style(TEXT, "auto", message)[1] == style


def test_sentences_do_not_split_abbreviations_or_lowercase_continuations():
    assert sentences("Use e.g. the app. Then wait.") == ["Use e.g. the app.", "Then wait."]


def test_bad_options_name_the_flag():
    with pytest.raises(ValueError, match="--style_mode"):
        apply_style(TEXT, "pirate")
    with pytest.raises(ValueError, match="--creativity"):
        apply_style(TEXT, "creative", creativity=2)
