// Drives headless Chromium (Debian's, through playwright-core) for
// tests/integration/test_console.py.
//
// Protocol: one JSON object per line on stdin (commands) and stdout (answers).
//   startup: argv[2] = JSON {executablePath, width?, height?}
//   command: {seq, cmd, ...params}
//   answer:  {seq, ok: true, result} | {seq, ok: false, error: "message"}
// Commands: goto {url} | fill {selector, value} | click {selector} | select {selector, value}
//   | text {selector} | waitText {selector, pattern, timeout} | waitVisible {selector, timeout}
//   | count {selector} | evaluate {expression} | screenshot {path} | problems | close
// `problems` answers the page errors, failed requests and console errors seen so far.

import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const options = JSON.parse(process.argv[2] || '{}');
const userDataDir = mkdtempSync(join(tmpdir(), 'console-e2e-'));
const problems = [];

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: options.executablePath || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  viewport: { width: options.width || 1280, height: options.height || 900 },
});
const page = context.pages()[0] || (await context.newPage());
page.on('pageerror', (error) => problems.push(`pageerror: ${error.message}`));
page.on('console', (message) => {
  if (message.type() === 'error') problems.push(`console: ${message.text()}`);
});
page.on('requestfailed', (request) => {
  problems.push(`requestfailed: ${request.url()} ${request.failure()?.errorText}`);
});

async function shutdown() {
  await context.close().catch(() => {});
  rmSync(userDataDir, { recursive: true, force: true });
}

const commands = {
  goto: async ({ url }) => {
    const response = await page.goto(url, { waitUntil: 'load' });
    return response ? response.status() : null;
  },
  fill: ({ selector, value }) => page.fill(selector, value),
  click: ({ selector }) => page.click(selector),
  select: ({ selector, value }) => page.selectOption(selector, value),
  text: ({ selector }) => page.textContent(selector),
  count: ({ selector }) => page.locator(selector).count(),
  waitVisible: async ({ selector, timeout = 5000 }) => {
    await page.waitForSelector(selector, { state: 'visible', timeout });
  },
  // Waits until the element's text matches the regular expression; answers the text.
  waitText: async ({ selector, pattern, timeout = 5000 }) => {
    try {
      const handle = await page.waitForFunction(
        ([sel, source]) => {
          const element = document.querySelector(sel);
          const text = element ? element.textContent : null;
          // Wrapped: an empty text that matches must still end the wait.
          return text !== null && new RegExp(source).test(text) ? { text } : false;
        },
        [selector, pattern],
        { timeout, polling: 50 },
      );
      return (await handle.jsonValue()).text;
    } catch (error) {
      // Say what the page showed instead, and what went wrong in it.
      const text = await page.textContent(selector).catch(() => null);
      throw new Error(`${error.message}; text now: ${JSON.stringify(text)}; problems: ${JSON.stringify(problems)}`);
    }
  },
  evaluate: ({ expression }) => page.evaluate(expression),
  screenshot: async ({ path }) => {
    // Clicks scroll their target into view; the picture shows the page from its top.
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path, fullPage: false });
  },
  problems: () => problems.slice(),
};

function answer(seq, ok, value) {
  const line = ok ? { seq, ok, result: value ?? null } : { seq, ok, error: String(value) };
  process.stdout.write(JSON.stringify(line) + '\n');
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const { seq, cmd, ...params } = JSON.parse(line);
  if (cmd === 'close') {
    await shutdown();
    answer(seq, true, null);
    process.exit(0);
  }
  const handler = commands[cmd];
  try {
    if (!handler) throw new Error(`unknown command ${cmd}`);
    answer(seq, true, await handler(params));
  } catch (error) {
    answer(seq, false, error && error.message ? error.message : error);
  }
}
await shutdown();
