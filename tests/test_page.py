"""The chat page at / in a real headless browser (Debian's Chromium driven by Playwright), used as a
person would: type, send, read the answer, open the "why", ask a follow-up."""

import os
import shutil

import pytest

from interfaces.server import ServerConfig
from retrieval.answer import ChatEngine
from tests.conftest import INTENTS, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The probe's flags: no sandbox as root, and no background networking on a machine without a network.
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("CI needs Chromium for the page test: .ci/run installs Debian's chromium package")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (`apt-get install chromium`; make test does it)")


def test_type_send_read_the_answer_and_the_why(chat_model, tmp_path):
    from playwright.sync_api import sync_playwright

    with running_server(ChatEngine(*chat_model), ServerConfig(model_name="bucketchat-page")) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(url + "/")
        assert page.title() == "bucketchat"
        page.wait_for_function("document.getElementById('model').textContent.includes('bucketchat-page')")

        page.fill("#message", "how do I track my package")
        page.click("#send")
        bot = page.locator(".msg.bot").first
        bot.wait_for()
        assert bot.inner_text().startswith(INTENTS["track_order"][0])
        assert "confidence" in bot.locator(".meta").inner_text()

        bot.locator("button.why-toggle").click()
        why = bot.locator(".why")
        assert "Buckets: bucket" in why.inner_text()
        assert INTENTS["track_order"][0] in why.locator("li").first.inner_text()
        bot.locator("button.why-toggle").click()
        assert why.count() == 0

        page.fill("#message", "and what about that?")
        page.press("#message", "Enter")
        page.locator(".msg.bot").nth(1).wait_for()
        assert page.locator(".msg.bot").nth(1).inner_text().startswith(INTENTS["track_order"][0])
        page.screenshot(path=str(tmp_path / "page.png"))
        assert page.locator("#error").inner_text() == ""
        browser.close()


def test_the_page_asks_for_a_key_when_the_server_needs_one(chat_model):
    from playwright.sync_api import sync_playwright

    key = "page-key-0123456789"
    with running_server(ChatEngine(*chat_model), ServerConfig(api_key=key)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.once("dialog", lambda d: d.accept(key))
        page.goto(url + "/")
        page.fill("#message", "I forgot my password")
        page.click("#send")
        page.locator(".msg.bot").first.wait_for()
        assert page.locator(".msg.bot").first.inner_text().startswith(INTENTS["reset_password"][0])
        browser.close()


def test_thumbs_rate_an_answer_into_the_conversation_log(tmp_path, tiny_records):
    """A person clicks thumbs-down under an answer: the rating is kept with that turn in the log."""
    from playwright.sync_api import sync_playwright

    from retrieval.turn_log import TurnLog, read_turns
    from tests.conftest import train_chat_model

    engine = ChatEngine(*train_chat_model(tmp_path, tiny_records))
    engine.turn_log = TurnLog(tmp_path / "turns", model="page", table="conversations", table_version=1, source="serve")
    with running_server(engine, ServerConfig(model_name="bucketchat-page")) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#message", "how do I track my package")
        page.click("#send")
        bot = page.locator(".msg.bot").first
        bot.wait_for()
        bot.locator("button.rate.bad").click()
        page.wait_for_selector("button.rate.bad.chosen")
        assert page.locator("#error").inner_text() == ""
        browser.close()
    engine.turn_log.close()
    turns = read_turns(tmp_path / "turns").to_pylist()
    assert [(t["message"], t["feedback"]) for t in turns] == [("how do I track my package", "bad")]


def test_the_review_page_decides_a_group_into_a_drop(chat_model, tmp_path):
    """A person opens /review, sees the questions the bot fell back on as one group, writes the
    response it should give and saves it: the decision is a drop in the retrain folder."""
    import json

    import httpx
    from playwright.sync_api import sync_playwright

    from retrieval.turn_log import TurnLog

    engine = ChatEngine(*chat_model)
    engine.turn_log = TurnLog(tmp_path / "turns", model="page", table="conversations", table_version=1, source="serve")
    asked = ["who won the football world cup in 1954?", "which team won the 1954 football world cup?"]
    try:
        with running_server(engine, ServerConfig(drop_dir=str(tmp_path / "drops"))) as url, sync_playwright() as p:
            for q in asked:
                httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": q}]}, timeout=30)
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page()
            page.goto(url + "/review")
            group = page.locator(".group").first
            group.wait_for()
            assert page.locator(".group").count() == 1
            assert sorted(group.locator("li").all_inner_texts()) == sorted(asked)
            assert group.locator(".suggestion").count() >= 1  # the model's candidates to pick from
            group.locator("textarea").fill("West Germany won the 1954 World Cup.")
            group.locator("button.use").click()
            page.wait_for_selector(".status.done")
            assert "2 message(s) from 2 turn(s) written to" in group.locator(".status").inner_text()
            assert page.locator("#error").inner_text() == ""
            browser.close()
    finally:
        engine.turn_log.close()
    (drop,) = (tmp_path / "drops").glob("review-*.jsonl")
    records = [json.loads(l) for l in drop.read_text().splitlines()]
    assert sorted(r["user"] for r in records) == sorted(asked)
    assert {r["assistant"] for r in records} == {"West Germany won the 1954 World Cup."} and {r["review_decision"] for r in records} == {
        "new"
    }
