// Uses the operations console as its people do, through the pages only: Debian's chromium, headless.
//
//   node console.mjs BASE_URL SCREENSHOT_DIR OPERATOR_EMAIL VIEWER_EMAIL PASSWORD PARKED_JSON
//
// PARKED_JSON names five parked orders: {detail, selection, all, all_product, cancel, viewer}. The test that runs this
// script (crates/api/tests/it/console.rs) talks with it in lines of JSON:
//   1. it prints {"step":"watching","completed":N} once the operator sees the overview live; the test then creates
//      orders, which an in-process worker completes;
//   2. it prints {"step":"live","completed":M} once the page's count has grown by itself (no reload); by then the
//      page's access token cookie is gone, as if it had expired; the test then cuts every open connection (the
//      overview's stream with them) and creates more orders;
//   3. the page shows "Reconnecting…", renews the session, is live again and counts the new orders: it prints
//      {"step":"reconnected", ...};
//   4. then, on its own: re-drives one parked order from the parked list (a selection), finds another by its id and
//      re-drives it from its page until that page shows it COMPLETED, re-drives "all that match" a search after the
//      confirmation, cancels a pending one from its page, looks at the workers and the audit log, logs out; then a
//      viewer logs in with the keyboard alone and finds no action controls, and the API refuses their re-drive.
//      The last line is the result, {...} or {error}.
// Screenshots: SCREENSHOT_DIR/console-<screen>.png. CHROMIUM names the browser (default /usr/bin/chromium).
import { chromium } from 'playwright-core';

const [base, screenshots, operator, viewer, password, parkedJson] = process.argv.slice(2);
const parked = JSON.parse(parkedJson);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = { problems: [] };
const say = (line) => console.log(JSON.stringify(line));

const laptop = { width: 1280, height: 900 };
let current = null;

async function snap(page, name, fullPage = true) {
  await page.screenshot({ path: `${screenshots}/console-${name}.png`, fullPage });
}

/** A page that records what goes wrong in it: uncaught errors, and what the Content-Security-Policy refused. */
async function newPage(context) {
  const page = await context.newPage();
  page.on('pageerror', (error) => result.problems.push(`page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error' && /Refused|Uncaught/.test(message.text())) {
      result.problems.push(`console: ${message.text()}`);
    }
  });
  current = page;
  return page;
}

/** Logs in through the form, as a person would, arriving at `path`. */
async function logIn(page, email, path = '/console', screenshot = null) {
  await page.goto(`${base}${path}`);
  await page.waitForURL(/\/console\/login\?next=/);
  await page.getByLabel('Email').fill(email);
  await page.getByLabel('Password').fill(password);
  if (screenshot) await snap(page, screenshot);
  await page.getByRole('button', { name: 'Log in' }).click();
  await page.waitForURL((url) => url.pathname === path);
  await page.locator('#whoami .role').waitFor();
}

const completed = (page) => page.locator('#stat-completed').innerText().then((text) => Number(text.replace(/\D/g, '')));

/** Every form control without a label, per page: there should be none. */
async function unlabelled(page) {
  return page.evaluate(() => [...document.querySelectorAll('input, select, textarea, button')]
    .filter((control) => control.type !== 'hidden')
    .filter((control) => !(control.labels && control.labels.length) && !control.getAttribute('aria-label')
      && !(control.tagName === 'BUTTON' && control.textContent.trim()))
    .map((control) => control.outerHTML));
}

try {
  // ---- The operator: the overview, live. ----
  const context = await browser.newContext({ viewport: laptop });
  const page = await newPage(context);
  await logIn(page, operator, '/console', 'login');
  await page.locator('#live[data-state="live"]').waitFor({ timeout: 30000 });
  await page.locator('#stat-completed').waitFor();
  const before = await completed(page);
  say({ step: 'watching', completed: before });

  // The test creates 5 orders now; the page counts them as they complete, without a reload.
  await page.waitForFunction((min) => {
    const node = document.querySelector('#stat-completed');
    return node && Number(node.textContent.replace(/\D/g, '')) >= min;
  }, before + 5, { timeout: 90000, polling: 100 });
  const afterFirst = await completed(page);
  result.live_increase = afterFirst - before;
  result.chart_bars = await page.locator('#throughput-chart rect.bar').count();
  await snap(page, 'overview');
  await page.setViewportSize({ width: 390, height: 844 });
  // The chart is drawn again at the phone's width.
  await page.waitForFunction(() => {
    const picture = document.querySelector('#throughput-chart svg');
    return picture && Number(picture.getAttribute('width')) < 390;
  });
  await snap(page, 'overview-phone');
  await page.setViewportSize(laptop);
  result.unlabelled = { overview: await unlabelled(page) };

  // As if the access token had expired: its cookie is gone. Record what the live indicator goes through.
  await context.clearCookies({ name: 'console_token' });
  await page.evaluate(() => {
    const live = document.querySelector('#live');
    window.liveStates = [];
    new MutationObserver(() => window.liveStates.push(live.dataset.state))
      .observe(live, { attributes: true, attributeFilter: ['data-state'] });
  });
  say({ step: 'live', completed: afterFirst });

  // The test cuts the connections and creates 3 more orders: the page reconnects, renews its session and counts
  // them.
  await page.waitForFunction(() => window.liveStates.includes('reconnecting'), null, { timeout: 30000 });
  await page.locator('#live[data-state="live"]').waitFor({ timeout: 60000 });
  await page.waitForFunction((min) => Number(document.querySelector('#stat-completed').textContent.replace(/\D/g, '')) >= min,
    afterFirst + 3, { timeout: 90000, polling: 100 });
  result.live_states = await page.evaluate(() => window.liveStates);
  result.renewed_token = (await context.cookies()).some((cookie) => cookie.name === 'console_token');
  say({ step: 'reconnected', completed: await completed(page) });

  // ---- Parked orders: re-drive a selection. ----
  await page.goto(`${base}/console/parked`);
  await page.locator(`tr[data-order="${parked.selection}"]`).waitFor();
  await snap(page, 'parked');
  result.unlabelled.parked = await unlabelled(page);
  await page.getByLabel(`Select order ${parked.selection}`).check();
  await page.getByRole('button', { name: 'Re-drive selected (1)' }).click();
  await page.locator('.outcome').waitFor();
  result.selection_outcome = await page.locator('.outcome').innerText();

  // ---- Find a parked order by its id, re-drive it, watch it complete. ----
  await page.goto(`${base}/console/orders`);
  await page.getByLabel('Order id').fill(parked.detail);
  await page.getByRole('button', { name: 'Search', exact: true }).click();
  await page.waitForURL(/\/console\/orders\?id=/);
  const link = page.getByRole('link', { name: parked.detail });
  await link.waitFor();
  await snap(page, 'orders');
  result.unlabelled.orders = await unlabelled(page);
  await page.setViewportSize({ width: 390, height: 844 });
  await snap(page, 'orders-phone');
  await page.setViewportSize(laptop);
  await link.click();
  await page.waitForURL(`${base}/console/orders/${parked.detail}`);
  await page.locator('#order-details').waitFor();
  result.detail_parked = await page.locator('#order-details .status.parked').count() === 1;
  result.detail_last_error = await page.locator('#order-details').innerText();
  result.timeline_parked = await page.locator('#timeline li').allInnerTexts();
  // An unfinished order is followed live, over its event stream.
  await page.waitForFunction(() => document.querySelector('#following')?.textContent.startsWith('Live'));
  result.following_parked = await page.locator('#following').innerText();
  await snap(page, 'order-parked');
  await page.getByRole('button', { name: 'Re-drive', exact: true }).click();
  await page.locator('#outcome .outcome').waitFor();
  result.detail_outcome = await page.locator('#outcome .outcome').innerText();
  await page.waitForFunction(() => document.querySelector('#order-status')?.textContent === 'completed', null,
    { timeout: 90000, polling: 200 });
  result.detail_status = await page.locator('#order-status').innerText();
  result.timeline = await page.locator('#timeline li').allInnerTexts();
  result.following_done = await page.locator('#following').innerText();
  await snap(page, 'order');

  // ---- Re-drive everything a search matches, after the confirmation. ----
  await page.goto(`${base}/console/orders?${new URLSearchParams({ product: parked.all_product, parked: 'true' })}`);
  await page.locator(`tr[data-order="${parked.all}"]`).waitFor();
  await page.getByRole('button', { name: 'Re-drive all matching…' }).click();
  const dialog = page.getByRole('dialog');
  await dialog.waitFor();
  result.confirmation = await dialog.innerText();
  await snap(page, 'confirm', false);
  await dialog.getByRole('button', { name: 'Re-drive 1', exact: true }).click();
  await page.locator('.outcome').waitFor();
  result.all_outcome = await page.locator('.outcome').innerText();

  // ---- Cancel a pending order from its page, after the confirmation. ----
  await page.goto(`${base}/console/orders/${parked.cancel}`);
  await page.getByRole('button', { name: 'Cancel order' }).click();
  const cancelDialog = page.getByRole('dialog');
  await cancelDialog.waitFor();
  await cancelDialog.getByRole('button', { name: 'Cancel order' }).click();
  await page.locator('#outcome .outcome').waitFor();
  result.cancel_outcome = await page.locator('#outcome .outcome').innerText();
  await page.waitForFunction(() => document.querySelector('#order-status')?.textContent === 'cancelled');
  result.cancel_buttons_after = await page.getByRole('button', { name: /re-drive|cancel order/i }).count();

  // ---- Workers and the audit log. ----
  await page.goto(`${base}/console/workers`);
  await page.locator('#workers table, #workers .notice').first().waitFor();
  result.workers = await page.locator('#workers tbody tr').count();
  await snap(page, 'workers');
  await page.goto(`${base}/console/audit`);
  await page.locator('#results table').waitFor();
  result.audit_actions = await page.locator('#results tbody th[scope="row"]').allInnerTexts();
  await snap(page, 'audit');

  await page.getByRole('button', { name: 'Log out' }).click();
  await page.waitForURL(/\/console\/login/);
  result.logged_out = !(await context.cookies()).some((cookie) => cookie.name === 'console_token');
  await context.close();

  // ---- A viewer, with the keyboard alone: the same screens, no action. ----
  const viewing = await browser.newContext({ viewport: laptop });
  const viewerPage = await newPage(viewing);
  await viewerPage.goto(`${base}/console/parked`);
  await viewerPage.waitForURL(/\/console\/login\?next=/);
  await viewerPage.keyboard.press('Tab');
  await viewerPage.keyboard.type(viewer);
  await viewerPage.keyboard.press('Tab');
  await viewerPage.keyboard.type(password);
  await viewerPage.keyboard.press('Enter');
  await viewerPage.waitForURL((url) => url.pathname === '/console/parked');
  await viewerPage.locator('#whoami .role').waitFor();
  // The first Tab on a page reaches the skip link, shown with a visible focus ring.
  await viewerPage.keyboard.press('Tab');
  result.viewer_first_focus = await viewerPage.evaluate(() => {
    const focused = document.activeElement;
    const style = getComputedStyle(focused);
    const box = focused.getBoundingClientRect();
    return { text: focused.textContent.trim(), outline: style.outlineStyle, on_screen: box.top >= 0 && box.height > 0 };
  });
  await viewerPage.locator(`tr[data-order="${parked.viewer}"]`).waitFor();
  result.viewer_checkboxes = await viewerPage.locator('main input[type="checkbox"]').count();
  result.viewer_action_buttons = await viewerPage.getByRole('button', { name: /re-drive|cancel/i }).count();
  await viewerPage.getByRole('link', { name: parked.viewer }).click();
  await viewerPage.locator('#order-details').waitFor();
  result.viewer_detail_actions = await viewerPage.locator('#actions:not([hidden]), #redrive, #cancel').count();
  await snap(viewerPage, 'viewer');
  // The API refuses a viewer's action anyway, with the right CSRF header.
  result.viewer_redrive_status = await viewerPage.evaluate(async (id) => {
    const csrf = document.cookie.split('; ').find((c) => c.startsWith('console_csrf=')).split('=')[1];
    const response = await fetch('/admin/orders/redrive', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
      body: JSON.stringify({ ids: [id] }),
    });
    return response.status;
  }, parked.viewer);
  await viewing.close();
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err);
  try { if (current) await snap(current, 'error', false); } catch { /* the page is gone */ }
} finally {
  console.log(JSON.stringify(result));
  await browser.close();
}
