"""Driving the talk page in headless Chromium, for the in-process and the Serve gateways.

A fake microphone (a WAV: a pause, the question, silence) speaks into the page, which
streams it to a gateway; `talk_through_page` checks that the page shows the transcript
and the reply, plays the avatar's voice and draws its live video in step with it, then
stops and finds the session ended.

Needs Debian's `chromium` (in the Makefile's DEBIAN_PACKAGES) and the `playwright`
Python package (dev extra), which drives that browser: no browser download.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from parley.audio import write_wav

from services.tts.engine import TtsEngine

#: Debian's Chromium (its launcher script); Playwright drives it, downloading nothing.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUESTION = "What is the capital of France?"


async def microphone_wav(tts_engine: TtsEngine, directory: Path) -> Path:
    """A WAV the fake microphone plays once: a pause, the question, then silence."""
    speech = await tts_engine.synthesize(QUESTION)
    rate = speech.sample_rate
    audio = np.concatenate(
        [np.zeros(rate, np.float32), speech.samples, np.zeros(8 * rate, np.float32)]
    )
    path = directory / "question.wav"
    write_wav(path, audio, rate)
    return path


async def launch_chromium(microphone: Path) -> AsyncIterator[Any]:
    """Headless Chromium whose microphone plays `microphone` (use as an async generator)."""
    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(
            "chromium is not installed (Debian package chromium; `make install` as root adds it)"
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--use-fake-ui-for-media-stream",  # grant the microphone
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={microphone}%noloop",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            yield chromium
        finally:
            await chromium.close()


# Counts distinct canvas images every 100 ms, and how late each drawn frame was.
WATCH_CANVAS = """
() => {
  window.__canvas = { images: new Set(), blank: 0, samples: 0 };
  const canvas = document.getElementById("video");
  const g = canvas.getContext("2d", { willReadFrequently: true });
  setInterval(() => {
    const px = g.getImageData(0, 0, canvas.width, canvas.height).data;
    let sum = 0, sq = 0, hash = 0;
    for (let i = 0; i < px.length; i += 4) {
      const v = px[i] + px[i + 1] + px[i + 2];
      sum += v; sq += v * v; hash = (hash * 31 + v) | 0;
    }
    const n = px.length / 4, mean = sum / n;
    window.__canvas.samples += 1;
    if (sq / n - mean * mean < 100) window.__canvas.blank += 1;  // one flat colour
    else window.__canvas.images.add(hash);
  }, 100);
}
"""


async def talk_through_page(browser: Any, base_url: str, api_key: str) -> dict[str, Any]:
    """Talk to the avatar through the page at `base_url`; assert what a person would see
    and hear; returns the page's statistics."""
    page = await browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning")
            else None
        ),
    )
    page.on(
        "response",
        lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None,
    )
    response = await page.goto(base_url + "/")
    assert response is not None and response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    await page.evaluate(WATCH_CANVAS)
    await page.fill("#key", api_key)
    await page.click("#start")
    # The reply's latency line comes once the avatar has finished speaking.
    await page.wait_for_function(
        "() => window.parley.latencies.length > 0 || window.parley.errors.length > 0",
        timeout=90_000,
        polling=200,
    )
    stats = await page.evaluate("() => window.parley")
    assert not stats["errors"], stats["errors"]
    heard = " ".join(stats["userFinals"]).lower()
    assert "capital" in heard and "france" in heard, stats["userFinals"]
    reply = stats["avatarText"]["1"].strip()
    assert reply, stats
    log = await page.inner_text("#log")
    assert "You: " in log and f"Avatar: {reply}" in log, log
    [latency] = stats["latencies"]
    assert 0 < latency["first_output_s"] <= latency["first_frame_s"] < 10, latency
    assert "turn 1: voice" in log

    # The avatar's voice arrived and was scheduled (24 kHz PCM16).
    assert stats["audioSeconds"] > 0.3, stats
    # Its live video came all along (~12 fps) and was drawn, in step with the voice.
    assert stats["videoFrames"] >= 20 and stats["videoErrors"] == 0, stats
    assert stats["videoDrawn"] >= 0.8 * stats["videoFrames"] - 3, stats
    assert stats["micFrames"] > 100, stats
    # Drawn when their time came on the voice's clock (a 60 Hz display: within ~17 ms).
    assert stats["voiceAnchored"] > 0, stats
    late = sorted(stats["videoLateMs"])
    assert late and late[len(late) // 2] <= 40, late
    print(
        f"\nvideo: {stats['videoFrames']} frames, {stats['videoDrawn']} drawn, median"
        f" {late[len(late) // 2]} ms after their time; voice {stats['audioSeconds']:.2f} s;"
        f" latency {latency}; reply {reply!r}"
    )
    canvas = await page.evaluate(
        "() => ({ images: window.__canvas.images.size, blank: window.__canvas.blank,"
        " samples: window.__canvas.samples })"
    )
    # Not one flat colour once frames came, and changing (the mouth, blinks, the head).
    assert canvas["images"] >= 5, canvas
    meters = await page.inner_text("#meters")
    assert "frames drawn" in meters

    # Stop: the page ends the audio, the server closes cleanly, the session is ended.
    await page.click("#stop")
    await page.wait_for_function("() => window.parley.state === 'idle'", timeout=30_000)
    stats = await page.evaluate("() => window.parley")
    assert stats["closeCode"] == 1000, stats
    session_id = stats["sessionId"]
    for _ in range(50):
        sessions = await page.evaluate(
            """async ([key, id]) => {
                const r = await fetch(`v1/sessions/${id}`, { headers: { "X-API-Key": key } });
                return (await r.json()).state;
            }""",
            [api_key, session_id],
        )
        if sessions == "ended":
            break
        await asyncio.sleep(0.1)
    assert sessions == "ended"
    assert not problems, problems
    return stats
