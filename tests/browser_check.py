"""Load an HTML report in headless Chromium: console errors, rendered charts, a screenshot.

    python -m tests.browser_check REPORT.html SCREENSHOT.png   -> prints a JSON summary

Used by tests/test_html_report.py; Chromium is Debian's (/usr/bin/chromium), driven by
Playwright's Python client (no browser download)."""

import json
import os
import shutil
import sys

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

# every chart container must hold a canvas with painted pixels (Bokeh draws into shadow roots)
CHECK_JS = """
() => {
  function canvases(root, out) {
    for (const el of root.querySelectorAll('*')) {
      if (el.tagName === 'CANVAS') out.push(el);
      if (el.shadowRoot) canvases(el.shadowRoot, out);
    }
    return out;
  }
  const result = [];
  for (const box of document.querySelectorAll('.kv-chart')) {
    const cs = canvases(box, []);
    const hex = box.dataset.color || '';
    const want = hex ? [1, 3, 5].map(i => parseInt(hex.substr(i, 2), 16)) : null;
    let inked = 0, data = 0, biggest = 0;
    for (const c of cs) {
      biggest = Math.max(biggest, c.width * c.height);
      let d;
      try { d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; } catch (e) { continue; }
      for (let i = 0; i < d.length; i += 4) {
        if (d[i + 3] === 0) continue;
        if (d[i] < 235 || d[i + 1] < 235 || d[i + 2] < 235) inked++;  // anything but the white background
        if (want && Math.abs(d[i] - want[0]) < 12 && Math.abs(d[i + 1] - want[1]) < 12 && Math.abs(d[i + 2] - want[2]) < 12) data++;
      }
    }
    result.push({chart: box.dataset.chart, canvases: cs.length, area: biggest, inked: inked, data_pixels: data});
  }
  return result;
}
"""


def find_chromium():
    for c in (
        os.environ.get("KVPROF_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if c and os.path.exists(c):
            return c
    return None


def check(report: str, screenshot: str) -> dict:
    from playwright.sync_api import sync_playwright

    errors, dialogs, requests = [], [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on(
            "request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:", "blob:")) else None
        )
        page.goto("file://" + os.path.abspath(report))
        page.wait_for_load_state("load")
        page.wait_for_timeout(1500)  # Bokeh paints after load
        charts = page.evaluate(CHECK_JS)
        page.screenshot(path=screenshot, full_page=True)
        title = page.title()
        browser.close()
    return {"errors": errors, "dialogs": dialogs, "network": requests, "charts": charts, "title": title}


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1], sys.argv[2])))
