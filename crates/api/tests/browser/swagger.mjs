// Uses Swagger UI as a newcomer would, through the page only: register and log in with the examples it offers,
// Authorize with the access token, reload the page (the authorization must survive it), create an order with the
// suggested Idempotency-Key (Execute twice: the same order), list my orders, and cancel the order.
// Debian's chromium, headless.
//
//   node swagger.mjs BASE_URL SCREENSHOT_DIR
//
// Prints one line of JSON: {steps: [{step, status}], order_id, created_twice_same, authorized_after_reload,
// idempotency_key, listed, cancelled_status}, or {error} (with a screenshot of the page as it was). Saves a
// screenshot of each step as SCREENSHOT_DIR/swagger-<n>-<step>.png. CHROMIUM names the browser (default
// /usr/bin/chromium).
import { chromium } from 'playwright-core';

const [base, screenshots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const result = { steps: [] };
let shot = 0;
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const snap = async (name) => {
  shot += 1;
  await page.screenshot({ path: `${screenshots}/swagger-${shot}-${name}.png`, fullPage: false });
};

// Opens an operation (a click on its summary, as a person would), unless it is open already.
async function open(id) {
  const block = page.locator(`#operations-${id}`);
  if (!(await block.locator('.opblock-body').count())) {
    await block.locator('.opblock-summary-control').click();
  }
  await block.locator('.opblock-body').waitFor();
  return block;
}

// Presses Execute on an operation and waits for a new answer; returns its status and parsed JSON body.
async function execute(id, name) {
  const block = await open(id);
  const answered = page.waitForResponse((response) => response.request().resourceType() === 'fetch');
  await block.locator('button.execute').click();
  await answered;
  const status = block.locator('.live-responses-table .response .response-col_status').first();
  await status.waitFor();
  const code = Number((await status.innerText()).trim());
  const text = await block.locator('.live-responses-table .response .microlight').first().innerText();
  let body = null;
  try { body = JSON.parse(text); } catch { body = text; }
  result.steps.push({ step: name, status: code });
  await block.locator('.live-responses-table').scrollIntoViewIfNeeded();
  await snap(name);
  return { code, body };
}

try {
  await page.goto(`${base}/docs/`);
  await page.locator('.opblock').first().waitFor();
  await snap('opened');

  // Register and log in with the examples as the page fills them in.
  await execute('auth-register', 'register');
  const login = await execute('auth-login', 'login');
  const token = login.body.access_token;
  if (!token) throw new Error(`login answered ${login.code}: ${JSON.stringify(login.body)}`);

  // Authorize: the padlock button, the bearer field, Authorize, Close.
  await page.locator('.auth-wrapper button.authorize').click();
  await page.locator('.modal-ux input[type=text], .modal-ux input:not([type])').first().fill(token);
  await page.locator('.modal-ux button.authorize').click();
  await snap('authorized');
  await page.locator('.modal-ux button.btn-done').click();

  // A reload keeps the authorization (persistAuthorization) and suggests a new Idempotency-Key.
  await page.reload();
  await page.locator('.opblock').first().waitFor();
  result.authorized_after_reload = (await page.locator('.auth-wrapper button.authorize.locked').count()) > 0;

  const create = await open('orders-create_order');
  const key = create.locator('tr[data-param-name="Idempotency-Key"] input');
  result.idempotency_key = await key.inputValue();
  const first = await execute('orders-create_order', 'create');
  const again = await execute('orders-create_order', 'create-again');
  result.order_id = first.body.id;
  result.created_twice_same = first.code === 201 && again.code === 200 && again.body.id === first.body.id;

  const list = await execute('orders-list_my_orders', 'list');
  result.listed = Array.isArray(list.body) ? list.body.map((order) => order.id) : [];

  const cancel = await open('orders-cancel_order');
  await cancel.locator('tr[data-param-name="id"] input').fill(result.order_id);
  const cancelled = await execute('orders-cancel_order', 'cancel');
  result.cancelled_status = cancelled.body.status;
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err);
  try { await snap('error'); } catch { /* the page is gone */ }
} finally {
  console.log(JSON.stringify(result));
  await browser.close();
}
