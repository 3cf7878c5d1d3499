"""A headless Chromium driven over the DevTools protocol, for the report's browser test.

The protocol runs over a pipe (`--remote-debugging-pipe`: JSON messages ended by NUL, the
browser reading fd 3 and writing fd 4), so it needs no websocket library and no driver
download; only a `chromium` (Debian's package) or `google-chrome` on the PATH.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

NAMES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')


def find() -> str | None:
  """The first Chromium-like browser on the PATH, or None."""
  for name in NAMES:
    path = shutil.which(name)
    if path:
      return path
  return None


class Browser:
  """One headless browser and one page; `events` holds every event received, in order."""

  def __init__(self, executable: str, width: int = 1200, height: int = 900, timeout: float = 60):
    self.timeout = timeout
    self.events: list[dict[str, Any]] = []
    self._next = 0
    self._buffer = b''
    self._profile = tempfile.mkdtemp(prefix='sweep-chromium-')
    to_browser_r, self._to_browser = os.pipe()
    self._from_browser, from_browser_w = os.pipe()

    flags = [
      '--headless',
      '--no-sandbox',  # the tests may run as root, where the sandbox refuses to start
      '--remote-debugging-pipe',
      f'--user-data-dir={self._profile}',
      f'--window-size={width},{height}',
      '--enable-unsafe-swiftshader',  # WebGL in software: plotly's parallel coordinates use it
      '--no-first-run',
      '--no-default-browser-check',
      '--disable-extensions',
      '--disable-background-networking',
      'about:blank',
    ]
    # A small Python puts the pipe ends at fds 3 and 4 and becomes the browser (a
    # preexec_fn would do it in a fork of this process, which runs JAX's threads).
    trampoline = (
      'import fcntl, os, sys\n'
      'r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3])\n'
      'os.dup2(r, 3); os.dup2(w, 4)\n'
      'os.execv(sys.argv[3], sys.argv[3:])\n'
    )
    self._process = subprocess.Popen(
      [sys.executable, '-c', trampoline, str(to_browser_r), str(from_browser_w), executable]
      + flags,
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
      pass_fds=(to_browser_r, from_browser_w),
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    target = self.send('Target.createTarget', url='about:blank')['targetId']
    self._session = self.send('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
    for domain in ('Page', 'Runtime', 'Log', 'Network'):
      self.send(f'{domain}.enable', session=True)

  # ------------------------------------------------------------------ protocol ----

  def _read(self, deadline: float) -> dict[str, Any]:
    while b'\0' not in self._buffer:
      left = deadline - time.monotonic()
      if left <= 0:
        raise TimeoutError('no message from the browser in time')
      ready, _, _ = select.select([self._from_browser], [], [], left)
      if ready:
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
          raise RuntimeError(f'the browser closed the pipe (exit code {self._process.poll()})')
        self._buffer += chunk
    message, self._buffer = self._buffer.split(b'\0', 1)
    return json.loads(message)

  def send(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
    """Sends a command; returns its result (events received meanwhile go to `events`)."""
    self._next += 1
    message = {'id': self._next, 'method': method, 'params': params}
    if session:
      message['sessionId'] = self._session
    os.write(self._to_browser, json.dumps(message).encode() + b'\0')
    deadline = time.monotonic() + self.timeout
    while True:
      reply = self._read(deadline)
      if reply.get('id') == self._next:
        if 'error' in reply:
          raise RuntimeError(f'{method}: {reply["error"]}')
        return reply.get('result', {})
      self.events.append(reply)

  def wait_for(self, method: str) -> dict[str, Any]:
    """The first event `method` (one already received counts)."""
    deadline = time.monotonic() + self.timeout
    seen = 0
    while True:
      for event in self.events[seen:]:
        if event.get('method') == method:
          return event
      seen = len(self.events)
      self.events.append(self._read(deadline))

  # ------------------------------------------------------------------- helpers ----

  def open(self, url: str) -> None:
    """Loads `url` and waits for its load event."""
    self.send('Page.navigate', session=True, url=url)
    self.wait_for('Page.loadEventFired')

  def evaluate(self, expression: str) -> Any:
    """The value of a JavaScript expression in the page (awaited if it is a promise)."""
    result = self.send(
      'Runtime.evaluate',
      session=True,
      expression=expression,
      returnByValue=True,
      awaitPromise=True,
    )
    if 'exceptionDetails' in result:
      raise RuntimeError(f'{expression}: {result["exceptionDetails"]}')
    return result['result'].get('value')

  def screenshot(self, path: str, width: int = 1200) -> None:
    """The whole page as a PNG: the window made as tall as the page first (capturing beyond
    the window instead leaves the plots where they were laid out for the smaller one)."""
    import base64

    height = int(self.evaluate('document.documentElement.scrollHeight'))
    self.send(
      'Emulation.setDeviceMetricsOverride',
      session=True,
      width=width,
      height=height,
      deviceScaleFactor=1,
      mobile=False,
    )
    # Two frames: the resize handlers (plotly's responsive layout) run, then paint.
    self.evaluate('new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))')
    data = self.send('Page.captureScreenshot', session=True, format='png')
    with open(path, 'wb') as f:
      f.write(base64.b64decode(data['data']))

  def errors(self) -> list[str]:
    """Console errors, uncaught exceptions and error log entries, as text."""
    out = []
    for event in self.events:
      method, params = event.get('method'), event.get('params', {})
      if method == 'Runtime.exceptionThrown':
        details = params['exceptionDetails']
        out.append(str(details.get('exception', {}).get('description') or details.get('text')))
      elif method == 'Runtime.consoleAPICalled' and params.get('type') in ('error', 'assert'):
        out.append(' '.join(str(a.get('value', a.get('description'))) for a in params['args']))
      elif method == 'Log.entryAdded' and params['entry']['level'] == 'error':
        out.append(f'{params["entry"]["source"]}: {params["entry"]["text"]}')
    return out

  def requests(self) -> list[str]:
    """The URL of every request the page made."""
    return [
      e['params']['request']['url']
      for e in self.events
      if e.get('method') == 'Network.requestWillBeSent'
    ]

  def close(self) -> None:
    try:
      self.send('Browser.close')
    except (RuntimeError, TimeoutError, OSError):
      pass
    try:
      self._process.wait(10)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
    for fd in (self._to_browser, self._from_browser):
      try:
        os.close(fd)
      except OSError:
        pass
    shutil.rmtree(self._profile, ignore_errors=True)

  def __enter__(self) -> Browser:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
