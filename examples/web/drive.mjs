// Opens the page in headless Chromium (puppeteer-core, no browser download) and prints each run's result.
//
//   node drive.mjs URL [URL ...] [--chromium /usr/bin/chromium] [--screenshot FILE] [--timeout 300]
//
// Each URL (e.g. http://127.0.0.1:8000/?dtype=q4&prompt=ROMEO:&max_new_tokens=20&greedy=1) opens in a new
// page of one browser; when <body data-state> is "done" or "error" the page's <pre id="result"> is printed
// as one line of JSON. --screenshot saves the last page. Every host but 127.0.0.1 is unresolvable in this
// browser, so a page that reached for a CDN would fail. Exit code 1 when a page ended in error.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import puppeteer from 'puppeteer-core';

const { values: options, positionals: urls } = parseArgs({
  allowPositionals: true,
  options: {
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    screenshot: { type: 'string' },
    timeout: { type: 'string', default: '300' },
  },
});
if (urls.length === 0) {
  console.error('usage: node drive.mjs URL [URL ...] [--chromium PATH] [--screenshot FILE] [--timeout SECONDS]');
  process.exit(2);
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'gptdeploy-chromium-'));
const browser = await puppeteer.launch({
  executablePath: options.chromium,
  headless: true,
  userDataDir: profile,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
  ],
});
let failed = false;
try {
  for (const [i, url] of urls.entries()) {
    const page = await browser.newPage();
    await page.setViewport({ width: 1000, height: 820 });
    const problems = [];
    page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
    page.on('requestfailed', (request) => {
      // transformers.js aborts some requests it has made twice (config.json): not a failure
      const reason = request.failure()?.errorText;
      if (reason !== 'net::ERR_ABORTED') problems.push(`failed request: ${request.url()} (${reason})`);
    });
    await page.goto(url);
    await page.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state),
      { timeout: Number(options.timeout) * 1000, polling: 100 });
    const result = JSON.parse(await page.$eval('#result', (e) => e.textContent));
    // how many times the page showed the text while it was generated (one per token when it streams)
    result.page_updates = Number(await page.$eval('#output', (e) => e.dataset.updates));
    if (problems.length) result.problems = problems;
    failed ||= 'error' in result;
    console.log(JSON.stringify({ url, ...result }));
    if (options.screenshot && i === urls.length - 1) await page.screenshot({ path: options.screenshot, fullPage: true });
    await page.close();
  }
} finally {
  await browser.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
