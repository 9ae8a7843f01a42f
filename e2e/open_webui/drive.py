"""Drive Open WebUI in Debian's Chromium (Playwright) through what a new user does with rkllama
behind it, one step at a time, with a screenshot per step. Exits non-zero if any step failed.

Run by run.sh with the e2e venv's Python; it needs the URLs of Open WebUI, of the recording proxy
(for step markers) and of rkllama itself (to check what the server did), and rkllama's log file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CANCEL_LOG_LINE = "cancelled; the runner stopped after"
FIRST_QUESTION = "Why is the sky blue?"
FOLLOW_UP = "Say it again in one short sentence."
LONG_STORY = "Write a very long story about a dragon who learns to bake bread. Use many chapters."
OPENAI_QUESTION = "Name three colours."
PICTURE_QUESTION = "What is in this picture?"
VISION_MODEL = "SmolVision:latest"


@dataclass
class Context:
    page: Page
    webui_url: str
    proxy_url: str
    rkllama_url: str
    server_log: Path
    shots: Path
    ollama_model: str
    openai_model: str
    answer_timeout: float
    picture: Path | None = None
    requests_log: Path | None = None
    results: list[tuple[str, bool, str]] = field(default_factory=list)

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"))

    def mark(self, phase: str) -> None:
        httpx.post(f"{self.proxy_url}/__e2e_phase/{phase}", timeout=10)

    def wait_idle(self, what: str, timeout: float | None = None) -> None:
        """Wait until no request from Open WebUI is in flight (its title/tags/follow-up tasks run
        after the answer is shown)."""
        wait_until(
            f"Open WebUI's requests to finish {what}",
            lambda: httpx.get(f"{self.proxy_url}/__e2e_in_flight", timeout=10).json() == [],
            timeout or self.answer_timeout,
            interval=1,
        )


def wait_until(what: str, condition: Callable[[], object], timeout: float, interval: float = 0.5) -> object:
    """Poll a condition until it holds (returns a truthy value) or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# --- the page -------------------------------------------------------------------------------
def open_app(ctx: Context) -> None:
    page = ctx.page
    page.goto(ctx.webui_url, wait_until="load")
    page.wait_for_selector("#chat-input", timeout=120_000)
    # A fresh install greets the user with release notes; it covers the page until closed.
    whats_new = page.get_by_text("Okay, Let's Go!")
    try:
        whats_new.wait_for(timeout=5000)
        whats_new.click()
    except Exception:  # noqa: BLE001 - not shown (already dismissed): nothing to close
        pass
    sidebar_toggle = page.locator("button[aria-label='Open Sidebar']").first
    if sidebar_toggle.is_visible():
        sidebar_toggle.click()


def new_chat(ctx: Context) -> None:
    ctx.page.goto(ctx.webui_url, wait_until="load")
    ctx.page.wait_for_selector("#chat-input", timeout=60_000)


def select_model(ctx: Context, model_id: str) -> None:
    page = ctx.page
    page.locator("#model-selector-model-button").click()
    page.locator(f'[role=option][data-value="{model_id}"]').click()
    wait_until(
        f"{model_id} to be selected",
        lambda: (
            page.locator("#model-selector-model-button").get_attribute("aria-label") == f"Selected model: {model_id}"
        ),
        10,
    )


def send(ctx: Context, text: str) -> None:
    ctx.page.locator("#chat-input").click()
    ctx.page.keyboard.type(text)
    ctx.page.keyboard.press("Enter")


def assistant_messages(page: Page) -> list[dict]:
    return page.evaluate(
        """() => [...document.querySelectorAll('#messages-container [id^="message-"]')]
            .filter(e => e.querySelector('.chat-assistant'))
            .map(e => ({id: e.id, text: e.querySelector('.chat-assistant').innerText,
                        done: !!e.querySelector('button[aria-label="Regenerate"]')}))"""
    )


def wait_for_answer(ctx: Context, index: int) -> dict:
    """Wait for assistant message number `index` to finish; return what the user saw of it,
    including the distinct partial lengths seen while it streamed."""
    partial_lengths: set[int] = set()

    def finished() -> dict | None:
        messages = assistant_messages(ctx.page)
        if len(messages) <= index:
            return None
        message = messages[index]
        if not message["done"]:
            if message["text"].strip():
                partial_lengths.add(len(message["text"]))
            return None
        return message

    message = wait_until(f"answer {index + 1} to finish", finished, ctx.answer_timeout, interval=0.25)
    return {**message, "partial_lengths": sorted(partial_lengths)}


def stored_chat(ctx: Context) -> dict:
    """The chat as Open WebUI stored it (title, messages with their error field), read with the
    page's own token: errors have no stable selector in the DOM, the stored chat says it plainly."""
    chat_id = ctx.page.url.rstrip("/").rsplit("/c/", 1)[-1]
    return ctx.page.evaluate(
        """async (id) => {
            const r = await fetch(`/api/v1/chats/${id}`, {headers: {Authorization: `Bearer ${localStorage.token}`}});
            return await r.json();
        }""",
        chat_id,
    )


def check_answer(ctx: Context, message: dict, *, must_stream: bool = True) -> str:
    chat = stored_chat(ctx)
    stored = chat["chat"]["history"]["messages"][message["id"].removeprefix("message-")]
    if stored.get("error"):
        raise AssertionError(f"Open WebUI shows an error: {json.dumps(stored['error'])[:300]}")
    if not stored.get("content", "").strip():
        raise AssertionError("the answer is empty")
    if must_stream and len(message["partial_lengths"]) < 2:
        raise AssertionError(f"the answer did not stream (partial lengths seen: {message['partial_lengths']})")
    return f"{len(stored['content'])} chars, {len(message['partial_lengths'])} partial renders seen"


def rkllama_ps(ctx: Context) -> list[dict]:
    return httpx.get(f"{ctx.rkllama_url}/api/ps", timeout=10).json()["models"]


# --- the steps ------------------------------------------------------------------------------
def step_model_listed(ctx: Context) -> str:
    open_app(ctx)
    page = ctx.page
    page.locator("#model-selector-model-button").click()
    options = wait_until(
        "both connections' models in the picker",
        lambda: (
            ids
            if {ctx.ollama_model, ctx.openai_model}
            <= set(ids := page.locator("[role=option]").evaluate_all("els => els.map(e => e.dataset.value)"))
            else None
        ),
        60,
    )
    ctx.shot("01_model_picker")
    page.keyboard.press("Escape")
    select_model(ctx, ctx.ollama_model)
    return f"picker lists {options}"


def step_first_message(ctx: Context) -> str:
    send(ctx, FIRST_QUESTION)
    message = wait_for_answer(ctx, 0)
    ctx.shot("02_first_answer")
    return check_answer(ctx, message)


def step_follow_up(ctx: Context) -> str:
    send(ctx, FOLLOW_UP)
    message = wait_for_answer(ctx, 1)
    ctx.shot("03_follow_up")
    return check_answer(ctx, message)


def step_title(ctx: Context) -> str:
    title = wait_until(
        "the chat's title to change from 'New Chat'",
        lambda: t if (t := stored_chat(ctx)["title"]) != "New Chat" else None,
        ctx.answer_timeout,
        interval=1,
    )
    sidebar = ctx.page.locator("#sidebar-chats-content")
    wait_until(f"the sidebar to show the title {title!r}", lambda: title in sidebar.inner_text(), 30)
    ctx.shot("04_title")
    return f"title {title!r}"


def cancel_lines(ctx: Context) -> list[str]:
    """rkllama's log lines saying a runner stopped a request it was told to cancel."""
    return [line for line in ctx.server_log.read_text(errors="replace").splitlines() if CANCEL_LOG_LINE in line]


def step_stop(ctx: Context) -> str:
    cancels_before = len(cancel_lines(ctx))
    new_chat(ctx)
    send(ctx, LONG_STORY)
    wait_until(
        "the long answer to start streaming",
        lambda: (m := assistant_messages(ctx.page)) and len(m[0]["text"].strip()) > 40,
        ctx.answer_timeout,
        interval=0.25,
    )
    ctx.page.locator("button[aria-label='Stop']").click()
    stopped_at = len(assistant_messages(ctx.page)[0]["text"])
    line = wait_until(
        "rkllama to log that the runner stopped generating",
        lambda: lines[cancels_before] if len(lines := cancel_lines(ctx)) > cancels_before else None,
        120,
    )
    ctx.shot("05_stopped")
    return f"stopped at {stopped_at} chars; server: {line.split(' INFO ')[-1]}"


def step_unload(ctx: Context) -> str:
    # A user ejects a model they are done with; here that is once the side tasks have ended too.
    # (Ejected while they still run, it would be unloaded only once they end, as Ollama does.)
    ctx.wait_idle("before ejecting the model")
    page = ctx.page
    page.locator("#model-selector-model-button").click()
    option = page.locator(f'[role=option][data-value="{ctx.ollama_model}"]')
    option.hover()
    eject = page.locator("button[aria-label='Eject model']").first
    eject.click()
    wait_until("rkllama's /api/ps to be empty", lambda: rkllama_ps(ctx) == [], 60)
    ctx.shot("06_unloaded")
    page.keyboard.press("Escape")
    return "model unloaded (/api/ps empty)"


def step_openai(ctx: Context) -> str:
    new_chat(ctx)
    select_model(ctx, ctx.openai_model)
    send(ctx, OPENAI_QUESTION)
    first = wait_for_answer(ctx, 0)
    first_note = check_answer(ctx, first)
    send(ctx, FOLLOW_UP)
    second = wait_for_answer(ctx, 1)
    ctx.shot("07_openai_answer")
    return f"first: {first_note}; follow-up: {check_answer(ctx, second)}"


def chat_requests_with_images(ctx: Context) -> list[dict]:
    """The /api/chat requests Open WebUI sent with images, as the recording proxy logged them."""
    assert ctx.requests_log is not None
    entries = [json.loads(line) for line in ctx.requests_log.read_text().splitlines()]
    return [
        e
        for e in entries
        if e.get("event") == "request"
        and e.get("path") == "/api/chat"
        and isinstance(e.get("body"), dict)
        and any(m.get("images") for m in e["body"].get("messages", []))
    ]


def step_picture(ctx: Context) -> str:
    if ctx.picture is None:
        raise AssertionError("no --picture given")
    new_chat(ctx)
    select_model(ctx, VISION_MODEL)
    ctx.page.locator('input[type="file"]').first.set_input_files(str(ctx.picture))
    # Open WebUI uploads the file first and then shows it above the input; send only after that.
    wait_until(
        "the picture's preview above the input",
        lambda: ctx.page.evaluate(
            """() => [...document.querySelectorAll('img')].some(
                i => i.src.startsWith('data:image') || i.src.includes('/files/'))"""
        ),
        120,
    )
    ctx.shot("08_picture_attached")
    send(ctx, PICTURE_QUESTION)
    message = wait_for_answer(ctx, 0)
    ctx.shot("08_picture_answer")
    note = check_answer(ctx, message)
    sent = chat_requests_with_images(ctx)
    if not sent:
        raise AssertionError("Open WebUI sent no /api/chat request with images")
    images = sum(len(m.get("images") or []) for m in sent[-1]["body"]["messages"])
    return f"{note}; the chat request carried {images} image(s) to {sent[-1]['body']['model']}"


STEPS: list[tuple[str, Callable[[Context], str]]] = [
    ("model appears in the picker", step_model_listed),
    ("first message streams an answer (Ollama)", step_first_message),
    ("follow-up streams an answer (Ollama)", step_follow_up),
    ("title is set", step_title),
    ("stop cancels a long answer", step_stop),
    ("unload from the UI", step_unload),
    ("OpenAI connection: answer and follow-up", step_openai),
    ("a picture in a chat with a vision model (Ollama)", step_picture),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webui-url", required=True)
    parser.add_argument("--proxy-url", required=True)
    parser.add_argument("--rkllama-url", required=True)
    parser.add_argument("--server-log", type=Path, required=True)
    parser.add_argument("--screenshots", type=Path, required=True)
    parser.add_argument("--ollama-model", default="SmolLM2-135M-Instruct:latest")
    parser.add_argument("--openai-model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--answer-timeout", type=float, default=900, help="seconds one answer may take")
    parser.add_argument("--picture", type=Path, help="an image file to attach in the picture step")
    parser.add_argument("--requests-log", type=Path, help="the recording proxy's log (requests.jsonl)")
    parser.add_argument("--only", help="comma-separated step numbers to run (1-based), for debugging")
    args = parser.parse_args()
    args.screenshots.mkdir(parents=True, exist_ok=True)
    chosen = {int(n) for n in args.only.split(",")} if args.only else None

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        ctx = Context(
            page=page,
            webui_url=args.webui_url,
            proxy_url=args.proxy_url,
            rkllama_url=args.rkllama_url,
            server_log=args.server_log,
            shots=args.screenshots,
            ollama_model=args.ollama_model,
            openai_model=args.openai_model,
            answer_timeout=args.answer_timeout,
            picture=args.picture,
            requests_log=args.requests_log,
        )
        for number, (name, step) in enumerate(STEPS, start=1):
            if chosen is not None and number not in chosen:
                continue
            ctx.mark(step.__name__.removeprefix("step_"))
            started = time.monotonic()
            try:
                detail = step(ctx)
                ctx.results.append((name, True, detail))
            except Exception as exc:  # noqa: BLE001 - every step is reported, the run goes on
                ctx.shot(f"failed_{number:02d}")
                detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
                ctx.results.append((name, False, detail))
                traceback.print_exc(file=sys.stderr)
            status = "PASS" if ctx.results[-1][1] else "FAIL"
            print(f"[{status}] {number}. {name} ({time.monotonic() - started:.0f}s): {ctx.results[-1][2]}", flush=True)
        try:
            ctx.wait_idle("so the capture holds every exchange", timeout=300)
        except AssertionError as exc:
            print(f"note: {exc}", file=sys.stderr)
        browser.close()

    failed = [name for name, ok, _ in ctx.results if not ok]
    print(f"{len(ctx.results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
