// Follows one order with a browser's native EventSource, as a web page would: Debian's chromium, headless, on a
// page of the api's own origin. The page trades the access token for the `order_events` cookie, then opens
// `new EventSource('/orders/<id>/events')` and records what it sees until the EventSource stops by itself.
//
//   node eventsource.mjs BASE_URL ACCESS_TOKEN ORDER_ID SCREENSHOT.png
//
// Prints `open` once the first event has arrived, then, when the EventSource has closed (or after 60 s), one line
// of JSON: {events: [{id, status}], errors, opens, closed}. CHROMIUM names the browser (default /usr/bin/chromium).
import { chromium } from 'playwright-core';

const [base, token, orderId, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
try {
  const page = await browser.newPage();
  await page.exposeFunction('firstEvent', () => console.log('open'));
  await page.goto(`${base}/docs/`);
  const log = await page.evaluate(async ({ token, orderId }) => {
    const cookie = await fetch('/orders/events/cookie', {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}` },
    });
    if (cookie.status !== 204) return { error: `POST /orders/events/cookie answered ${cookie.status}` };
    return await new Promise((resolve) => {
      const log = { events: [], errors: 0, opens: 0, closed: false };
      const source = new EventSource(`/orders/${orderId}/events`);
      source.addEventListener('open', () => { log.opens += 1; });
      source.addEventListener('status', (event) => {
        log.events.push({ id: event.lastEventId, status: JSON.parse(event.data).status });
        if (log.events.length === 1) window.firstEvent();
      });
      source.addEventListener('error', () => {
        log.errors += 1;
        // CLOSED only when the server answered something other than a stream (the 204 at the end).
        if (source.readyState === EventSource.CLOSED) {
          log.closed = true;
          resolve(log);
        }
      });
      setTimeout(() => { source.close(); resolve(log); }, 60000);
    });
  }, { token, orderId });
  await page.evaluate((log) => {
    document.body.insertAdjacentHTML('afterbegin',
      `<pre id="eventsource-log" style="font-size:16px;padding:8px;background:#efe">${JSON.stringify(log, null, 1)}</pre>`);
  }, log);
  if (screenshot) await page.screenshot({ path: screenshot });
  console.log(JSON.stringify(log));
} finally {
  await browser.close();
}
