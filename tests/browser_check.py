"""
A real browser on app.py's page: headless Chromium opens it, types a prompt, presses Generate, waits until
every model's continuation has rendered, and saves a screenshot. Not part of the pytest run (it needs
Chromium: `apt install chromium`, and `pip install gradio websocket-client`); run it by hand:

    python tests/browser_check.py --log_dir log --out app.png      # a log folder with a checkpoint in it

It drives Chromium through its DevTools protocol, so nothing beyond those two packages is needed.
Exits 0 when the outputs rendered, and says what it saw.
"""

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The king said"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, check, timeout=120):
    deadline = time.time() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit(f"browser_check.py: timed out waiting for {what}")
        time.sleep(0.5)


class DevTools:
    """The page's DevTools websocket: send a command, get its result."""

    def __init__(self, ws_url):
        import websocket

        self.ws, self.next_id = websocket.create_connection(ws_url, timeout=60), 0

    def __call__(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                return reply.get("result", {})

    def js(self, expression):
        return self("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def main(argv=None):
    p = argparse.ArgumentParser(description="Check app.py's page in headless Chromium.")
    p.add_argument("--log_dir", default="log", help="the run folder app.py serves")
    p.add_argument("--out", default="app.png", help="where to save the screenshot")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = p.parse_args(argv)
    if not args.chromium:
        sys.exit("browser_check.py: error: no chromium on PATH: apt install chromium")
    app_port, cdp_port = free_port(), free_port()
    app = subprocess.Popen([sys.executable, os.path.join(REPO, "app.py"), "--log_dir", args.log_dir, "--device", "cpu",
                            "--port", str(app_port)], env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    profile = tempfile.mkdtemp(prefix="chromium_")
    browser = subprocess.Popen([args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                f"--remote-debugging-port={cdp_port}", "--remote-allow-origins=*",
                                f"--user-data-dir={profile}",
                                "--window-size=1400,1000", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{app_port}/"
        wait_for("the app", lambda: urllib.request.urlopen(url, timeout=2).status == 200)
        pages = wait_for("Chromium", lambda: json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{cdp_port}/json/list", timeout=2)))
        tab = DevTools(next(t for t in pages if t["type"] == "page")["webSocketDebuggerUrl"])
        tab("Page.navigate", url=url)
        wait_for("the prompt box", lambda: tab.js("!!document.querySelector('#prompt textarea')"))
        tab.js(f"""const box = document.querySelector('#prompt textarea');
                   box.value = {json.dumps(PROMPT)}; box.dispatchEvent(new Event('input', {{bubbles: true}}));""")
        time.sleep(0.5)
        tab.js("document.querySelector('#generate').click()")
        count = "document.querySelectorAll('#outputs .continuation').length"
        texts = "Array.from(document.querySelectorAll('#outputs .continuation')).map(e => e.textContent)"
        # done when at least two continuations are there and have stopped growing
        seen = []

        def settled():
            now = tab.js(texts) if tab.js(count) >= 2 else None
            seen.append(now)
            return now if now and len(seen) > 4 and seen[-1] == seen[-3] else None
        outputs = wait_for("two rendered continuations", settled, timeout=180)
        png = base64.b64decode(tab("Page.captureScreenshot", format="png")["data"])
        with open(args.out, "wb") as f:
            f.write(png)
    finally:
        browser.terminate()
        app.terminate()
        shutil.rmtree(profile, ignore_errors=True)
    assert all(t.startswith(PROMPT) and len(t) > len(PROMPT) for t in outputs), outputs
    assert len(set(outputs)) == len(outputs), "the models wrote the same text"
    print(f"browser_check.py: {len(outputs)} continuations rendered; screenshot {args.out} ({len(png):,} bytes)")
    for text in outputs:
        print("  " + text.replace("\n", "\\n")[:120])


if __name__ == "__main__":
    main()
