"""`make test-browser`: the shipped workflows in ComfyUI's real frontend, in headless Chromium (not part of
`make test`: CI has no browser).

1. Starts a headless ComfyUI (tools/comfy_launcher.py: the tiny default checkpoints, the example photos in
   input/) and opens its frontend in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
   selenium) at 1920x1080.
2. Opens the Templates browser, picks this extension's category and checks that it lists exactly the UI
   workflows, each with its thumbnail loaded (so no API-format file shows up as a template).
3. Loads every template from there, as a user would, and fails on a dialog (missing nodes, a load error), a
   node drawn red or of an unknown type, a layout problem in the frontend's own node sizes (overlapping
   nodes, a wire running right to left: tools.workflow_layout), or a node's title bar hidden under the
   frontend's top bar, side bar or any other overlay, or left of / above the window.
4. Sets the 1-reference workflow to 64x64, 5 frames, 2 steps in its widgets, presses Run, waits for the
   prompt, probes the MP4 that Phantom Save Video wrote (phantom_core.video_io.probe_mp4) and checks that the
   node's <video> preview loads and plays (readyState, duration, currentTime advancing).
5. Fails on any browser console error that comes from this extension (it names a Phantom node, this
   extension's folder, or one of our files); the frontend's own errors (e.g. its Comfy Registry look-ups,
   refused offline) are printed, not counted.

Screenshots of each step go to output/browser/. Exit status 0 when every check passed, 1 otherwise.

    .venv/bin/python -m tools.browser_check      # or: make test-browser
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import requests

from phantom_core.video_io import probe_mp4
from tools.comfy_launcher import ComfyServer
from tools.make_workflows import WORKFLOWS, workflow_weights_shipped
from tools.workflow_layout import layout_problems

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "output" / "browser"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WINDOW = (1920, 1080)
MODULE = "ComfyUI-Phantom"  # the extension's folder name in custom_nodes/: its Templates category
OURS = ("Phantom", MODULE, "phantom_")  # node ids / titles, the folder, our file names (tiny models, photos)
TINY = {"PhantomEncodeReferences": {"width": 64, "height": 64},
        "PhantomSampler": {"width": 64, "height": 64, "frames": 5, "steps": 2}}

log = logging.getLogger("phantom.browser")

GRAPH_JS = """
const g = window.app.graph, LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
const links = g.links instanceof Map ? [...g.links.values()] : Object.values(g.links ?? {});
return {nodes: (g.nodes ?? g._nodes).map(n => ({id: n.id, type: n.type, title: n.title, pos: [...n.pos],
          size: [...n.size], red: !!n.has_errors, known: !LG || !!LG.registered_node_types[n.type]})),
        links: links.filter(l => l).map(l => [l.origin_id, l.target_id])};
"""
# points along each node's title bar that are inside the window and not on the canvas itself
COVERED_JS = """
const c = window.app.canvas, el = c.canvas, r = el.getBoundingClientRect(), ds = c.ds, out = [];
for (const n of (window.app.graph.nodes ?? window.app.graph._nodes)) {
  for (const f of [0.03, 0.25, 0.5, 0.75]) {
    const sx = r.left + (n.pos[0] + f * n.size[0] + ds.offset[0]) * ds.scale;
    const sy = r.top + (n.pos[1] - 15 + ds.offset[1]) * ds.scale;
    if (sx < 0 || sy < 0) { out.push(`${n.title}: title bar at (${sx|0}, ${sy|0}) px, off the window`); continue; }
    if (sx >= window.innerWidth || sy >= window.innerHeight) continue;  // right of / below the window: pan
    const e = document.elementFromPoint(sx, sy);
    const by = e ? e.tagName + '.' + e.className : 'nothing';
    if (e !== el) out.push(`${n.title}: title bar at (${sx|0}, ${sy|0}) px under ${by}`);
  }
}
return out;
"""
CARDS_JS = """[...document.querySelectorAll('[data-testid^="template-workflow-"]')].map(c => ({
  name: c.dataset.testid.slice('template-workflow-'.length),
  images: [...c.querySelectorAll('img')].map(i => [i.currentSrc, i.complete && i.naturalWidth])}))"""
DIALOGS_JS = """
return [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent !== null)
  .filter(d => !d.querySelector('[data-testid="template-workflows-content"]')).map(d => d.innerText.slice(0, 400));
"""
VIDEO_JS = """
const done = arguments[arguments.length - 1];
const v = [...document.querySelectorAll('video')].find(v => (v.currentSrc || v.src).includes(arguments[0]));
if (!v) { done({found: false}); return; }
v.muted = true;
const t0 = v.currentTime;
v.play().catch(e => null).finally(() => setTimeout(() => done({found: true, readyState: v.readyState,
  duration: v.duration, width: v.videoWidth, height: v.videoHeight, advanced: v.currentTime > t0,
  error: v.error ? v.error.code : null}), 1500));
"""


class Checks:
    """The failures found so far, in words."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
            log.error("FAIL %s", message)
        return ok


def start_browser():
    """Headless Chromium at WINDOW with the browser console log kept (selenium, Debian's chromedriver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait_for(driver, script: str, what: str, timeout_s: float = 120.0, *args):
    """Poll `script` (JavaScript returning a truthy value when done) until it does; TimeoutError names `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Console:
    """The browser console, read as it goes: errors that come from this extension vs the frontend's own."""

    def __init__(self, driver) -> None:
        self.driver, self.ours, self.others = driver, [], []

    def read(self) -> None:
        for entry in self.driver.get_log("browser"):
            if entry["level"] != "SEVERE":
                continue
            text = entry["message"]
            ours = any(mark in text for mark in OURS) and "api.comfy.org" not in text  # registry look-ups
            (self.ours if ours else self.others).append(text[:500])


def open_templates(driver) -> None:
    """Open the Templates browser (if the first-run one is not already up) and pick this extension's category."""
    from selenium.webdriver.common.by import By

    if not driver.find_elements(By.CSS_SELECTOR, '[data-testid="template-workflows-content"]'):
        driver.execute_script("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    wait_for(driver, "return document.querySelector('[data-testid=\"template-workflows-content\"]')",
             "the Templates browser")
    category = wait_for(driver, f"""return [...document.querySelectorAll('.p-dialog *')]
        .find(e => e.children.length === 0 && e.textContent.trim() === '{MODULE}')""", f"the {MODULE} category")
    driver.execute_script("arguments[0].click()", category)
    time.sleep(1.0)


def check_templates(driver, checks: Checks) -> None:
    """This extension's category lists exactly the UI workflows, each thumbnail loaded."""
    open_templates(driver)
    titles = {spec.title for spec in WORKFLOWS.values()}
    wait_for(driver, f"return {CARDS_JS}.length", "the template cards")
    time.sleep(2.0)  # thumbnails load lazily
    cards = driver.execute_script(f"return {CARDS_JS}")
    names = {c["name"] for c in cards}
    checks.expect(names == titles, f"Templates browser, {MODULE}: lists {sorted(names)}, expected {sorted(titles)}")
    waiting = {spec.title for stem, spec in WORKFLOWS.items() if not workflow_weights_shipped(stem)}
    for card in (c for c in cards if c["name"] not in waiting):  # no thumbnail until its default is trained
        loaded = [src for src, width in card["images"] if width]  # fetched, then shown from a blob: URL
        checks.expect(bool(loaded), f"template {card['name']!r}: thumbnail not loaded ({card['images']})")
    driver.save_screenshot(str(OUT_DIR / "templates.png"))


def load_template(driver, title: str) -> None:
    """Click the template's card in the Templates browser and wait until its graph is on the canvas."""
    open_templates(driver)
    card = wait_for(driver, "return document.querySelector(`[data-testid=\"template-workflow-${arguments[0]}\"]`)",
                    f"the card of {title!r}", 30.0, title)
    driver.execute_script("arguments[0].click()", card)
    wait_for(driver, """return !document.querySelector('[data-testid="template-workflows-content"]')
        && (window.app.graph.nodes ?? window.app.graph._nodes).some(n => n.type === 'PhantomSampler')""",
             f"{title!r} on the canvas", 60.0)
    time.sleep(3.0)  # images load, DOM widgets settle


def check_workflow(driver, title: str, checks: Checks) -> dict:
    """Dialogs, red or unknown nodes, the layout in the frontend's sizes, title bars not covered."""
    for text in driver.execute_script(DIALOGS_JS):
        checks.expect(False, f"{title}: a dialog is open: {text!r}")
    graph = driver.execute_script(GRAPH_JS)
    for node in graph["nodes"]:
        checks.expect(node["known"], f"{title}: node type {node['type']!r} is missing")
        checks.expect(not node["red"], f"{title}: {node['title']!r} is drawn with errors (red)")
    nodes = {n["id"]: (n["title"], (n["pos"], n["size"])) for n in graph["nodes"]}
    for problem in layout_problems(nodes, graph["links"], margin=10.0):
        checks.expect(False, f"{title} (frontend sizes): {problem}")
    for problem in driver.execute_script(COVERED_JS):
        checks.expect(False, f"{title}: {problem}")
    driver.save_screenshot(str(OUT_DIR / f"{title}.png"))
    return graph


def run_from_button(driver, server: ComfyServer, checks: Checks) -> None:
    """The loaded workflow at a tiny size, queued with the Run button; its MP4 probed and its preview played."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver.execute_script("""
      for (const n of (window.app.graph.nodes ?? window.app.graph._nodes)) {
        for (const [name, value] of Object.entries(arguments[0][n.type] ?? {})) {
          const w = n.widgets.find(w => w.name === name); w.value = value; w.callback?.(value);
        }
      }
      window.app.graph.setDirtyCanvas(true, true);""", TINY)
    before = set(requests.get(f"{server.url}/history", timeout=30).json())
    driver.find_element(By.CSS_SELECTOR, '[data-testid="queue-button"]').click()
    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "canvas")).perform()  # no tooltip
    deadline, entry = time.monotonic() + 300.0, None
    while time.monotonic() < deadline and entry is None:
        time.sleep(1.0)
        new = {k: v for k, v in requests.get(f"{server.url}/history", timeout=30).json().items() if k not in before}
        entry = next((v for v in new.values() if v.get("status", {}).get("completed") is not None), None)
    if not checks.expect(entry is not None, "Run: no prompt finished within 300 s"):
        return
    if not checks.expect(entry["status"]["status_str"] == "success", f"Run: the prompt failed: {entry['status']}"):
        return
    (result,) = next(out["images"] for out in entry["outputs"].values() if "images" in out)
    meta = probe_mp4(server.output_dir / result["subfolder"] / result["filename"])
    checks.expect((meta["frames"], meta["width"], meta["height"]) == (5, 64, 64), f"Run: the MP4 is {meta}")
    deadline, video = time.monotonic() + 30.0, {"found": False}
    while time.monotonic() < deadline and not (video.get("found") and video.get("readyState", 0) >= 2):
        video = driver.execute_async_script(VIDEO_JS, result["filename"])
        time.sleep(0.5)
    checks.expect(video.get("found", False), f"Run: no <video> shows {result['filename']}")
    if video.get("found"):
        checks.expect(video["readyState"] >= 2 and video["duration"] > 0 and video["error"] is None
                      and (video["width"], video["height"]) == (64, 64) and video["advanced"],
                      f"Run: the preview does not play: {video}")
    log.info("ran %s: %s; preview %s", result["filename"], meta, video)
    driver.save_screenshot(str(OUT_DIR / "run.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.glob("*.png"):  # only this run's screenshots
        old.unlink()
    checks, server = Checks(), ComfyServer()
    log.info("starting ComfyUI headless (log: %s)", server.log_path)
    server.start()
    driver = None
    try:
        driver = start_browser()
        console = Console(driver)
        driver.get(server.url)
        wait_for(driver, """return !!(window.app?.graph && window.app.canvas
            && (window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph)?.registered_node_types?.PhantomSampler)""",
                 "the frontend and the Phantom nodes")
        time.sleep(3.0)
        check_templates(driver, checks)
        for stem, spec in WORKFLOWS.items():
            load_template(driver, spec.title)
            check_workflow(driver, spec.title, checks)
            if stem == "phantom_1ref":
                run_from_button(driver, server, checks)
            console.read()
        for text in console.ours:
            checks.expect(False, f"console error from this extension: {text}")
        for text in console.others:
            log.info("console error not from this extension (ignored): %s", text[:300])
    except Exception as exc:  # a step that could not run is a failure too, with the server log
        checks.expect(False, f"{type(exc).__name__}: {exc}\n{server.log(3000)}")
    finally:
        if driver is not None:
            driver.quit()
        server.stop()
    log.info("screenshots: %s", OUT_DIR)
    if checks.failures:
        print(f"{len(checks.failures)} browser check(s) failed:\n" + "\n".join(f"- {f}" for f in checks.failures))
        return 1
    print(f"browser checks passed: {len(WORKFLOWS)} templates listed, loaded and laid out; the 1-reference "
          "workflow ran from the Run button and its video plays")
    return 0


if __name__ == "__main__":
    sys.exit(main())
