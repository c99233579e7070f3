// The console's one script. Each page is a static shell; this script fills it from the admin JSON API
// (/admin/...), authenticated by the console_token cookie, and sends X-CSRF-Token (the console_csrf cookie) with
// every request that changes something. The API decides who may read and who may act; the page only leaves out
// the controls a viewer could not use. Every value from the API reaches the page as text (textContent), never as
// markup.
'use strict';

(() => {
  const page = document.body.dataset.page;

  // ---- Small helpers -------------------------------------------------------------------------------------------

  const $ = (selector) => document.querySelector(selector);

  /** An element with attributes, listeners (`onclick`) and children (nodes or text). */
  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    setProps(node, props);
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  /** An SVG element with attributes and children. */
  function svg(tag, props, ...children) {
    const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
    setProps(node, props);
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function setProps(node, props) {
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.setAttribute('class', value);
      else if (key === 'text') node.textContent = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
  }

  function readCookie(name) {
    for (const part of document.cookie.split(';')) {
      const [key, ...value] = part.trim().split('=');
      if (key === name) return value.join('=');
    }
    return '';
  }

  const numberFormat = new Intl.NumberFormat();
  const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
  const minuteFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });

  function count(value) {
    return typeof value === 'number' ? numberFormat.format(value) : '–';
  }

  /** A <time> showing a moment in the browser's time zone, with the exact UTC value as its title. */
  function time(iso) {
    if (!iso) return h('span', { class: 'muted', text: '–' });
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return h('time', { datetime: iso, title: date.toISOString() }, dateFormat.format(date));
  }

  function duration(ms) {
    if (typeof ms !== 'number' || !Number.isFinite(ms)) return '–';
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 120000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
    return `${(ms / 60000).toFixed(1)} min`;
  }

  function ago(iso) {
    const seconds = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (!Number.isFinite(seconds)) return '';
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    return `${Math.floor(seconds / 3600)} h ago`;
  }

  const moneyFormat = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });

  /** An amount as the API sends it (a JSON number with at most 2 decimal places), with its 2 decimals. */
  function money(amount) {
    return typeof amount === 'number' ? moneyFormat.format(amount) : String(amount ?? '–');
  }

  function statusBadge(status) {
    const known = ['PENDING', 'PROCESSING', 'COMPLETED', 'CANCELLED'].includes(status);
    return h('span', { class: known ? `status ${status}` : 'status' }, String(status || '–').toLowerCase());
  }

  function parkedBadge() {
    return h('span', { class: 'status parked' }, 'parked');
  }

  function orderLink(id) {
    return h('a', { href: `/console/orders/${encodeURIComponent(id)}`, class: 'mono' }, id);
  }

  /**
   * A table in a region of its own that scrolls sideways when it must. Each cell also carries its column's name
   * (`data-label`), which a phone's narrow layout shows beside the value, one row a card.
   */
  function tableOf(caption, headings, rows) {
    const labels = headings.map((heading) => (typeof heading === 'string' ? heading : heading.label || heading.text || ''));
    for (const row of rows) {
      [...row.children].forEach((cell, i) => { cell.dataset.label = labels[i] || ''; });
    }
    return h('div', { class: 'table-wrap', tabindex: 0, role: 'region', 'aria-label': caption },
      h('table', null,
        h('caption', { class: 'visually-hidden' }, caption),
        h('thead', null, h('tr', null, headings.map((heading) =>
          typeof heading === 'string'
            ? h('th', { scope: 'col' }, heading)
            : h('th', { scope: 'col', class: heading.class }, heading.node || heading.text)))),
        h('tbody', null, rows)));
  }

  // ---- Talking to the API ----------------------------------------------------------------------------------------

  /** Thrown once the page is on its way to the login form: nothing more to do here. */
  class Leaving extends Error {}

  /** An answer other than 2xx: its status and the API's `detail`, for a person. */
  class Refused extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function toLogin() {
    const here = location.pathname + location.search;
    location.assign(`/console/login?next=${encodeURIComponent(here)}`);
    throw new Leaving();
  }

  let refreshing = null;

  /**
   * Renews the session with /console/refresh, once for every request that found the access token expired at the
   * same time, and once for every tab of the console: a refresh token presented twice ends the whole session (the
   * API takes it for a stolen token), so tabs take turns (Web Locks), and a tab whose turn comes after another tab
   * has refreshed (the console_csrf cookie changes with each refresh) has nothing to do. Resolves to 'ok', 'ended'
   * (log in again) or 'failed' (the service did not answer).
   */
  function refreshSession() {
    if (!refreshing) {
      const before = readCookie('console_csrf');
      const run = async () => {
        if (readCookie('console_csrf') !== before) return 'ok';
        try {
          const response = await fetch('/console/refresh', {
            method: 'POST',
            credentials: 'same-origin',
            headers: { 'X-CSRF-Token': before },
          });
          if (response.ok) return 'ok';
          return response.status === 401 || response.status === 403 ? 'ended' : 'failed';
        } catch {
          return 'failed';
        }
      };
      const turn = navigator.locks ? navigator.locks.request('orders-console-session', run) : run();
      refreshing = turn.finally(() => { refreshing = null; });
    }
    return refreshing;
  }

  /** A request to the API: renews the session once on a 401 and tries again; the login form if that fails. */
  async function call(path, { method = 'GET', body } = {}) {
    const send = () => {
      const headers = { Accept: 'application/json' };
      if (method !== 'GET') headers['X-CSRF-Token'] = readCookie('console_csrf');
      if (body !== undefined) headers['Content-Type'] = 'application/json';
      return fetch(path, {
        method,
        headers,
        credentials: 'same-origin',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    };
    let response;
    try {
      response = await send();
    } catch {
      throw new Refused(0, 'The service does not answer. Check the connection and try again.');
    }
    if (response.status === 401) {
      const renewed = await refreshSession();
      if (renewed === 'ended') toLogin();
      if (renewed === 'failed') throw new Refused(0, 'The session could not be renewed: the service does not answer.');
      response = await send();
      if (response.status === 401) toLogin();
    }
    if (!response.ok) throw new Refused(response.status, await detailOf(response));
    return response;
  }

  async function getJson(path) {
    const response = await call(path);
    return { body: await response.json(), response };
  }

  async function detailOf(response) {
    try {
      const body = await response.json();
      if (typeof body.detail === 'string') return body.detail;
      if (Array.isArray(body.detail)) {
        return body.detail.map((problem) => `${(problem.loc || []).slice(1).join('.')}: ${problem.msg}`).join('; ');
      }
    } catch { /* not JSON */ }
    return `The service answered ${response.status}.`;
  }

  /** The URL of the `rel="next"` page in a Link header, if any. */
  function nextLink(response) {
    const header = response.headers.get('Link') || '';
    for (const part of header.split(',')) {
      const match = part.match(/<([^>]*)>\s*;\s*rel="?next"?/);
      if (match) return new URL(match[1], location.origin);
    }
    return null;
  }

  function showProblem(error) {
    if (error instanceof Leaving) return;
    const box = $('#problem');
    box.textContent = error instanceof Refused ? error.message : `Something went wrong: ${error.message}`;
    box.hidden = false;
  }

  function clearProblem() {
    const box = $('#problem');
    box.hidden = true;
    box.textContent = '';
  }

  // ---- Who is here -------------------------------------------------------------------------------------------

  let me = null;
  const canAct = () => me !== null && me.role === 'operator';

  async function whoAmI() {
    try {
      me = (await getJson('/admin/me')).body;
    } catch (error) {
      if (error instanceof Refused && error.status === 403) {
        noAccess();
        throw new Leaving();
      }
      throw error;
    }
    const who = $('#whoami');
    who.replaceChildren(h('span', { class: 'email', title: me.email }, me.email), h('span', { class: 'role' }, me.role));
  }

  /**
   * After the answer to an event stream closed it (a token refused, say): checks the session, which renews it when
   * it can, then calls `reopen` after a back-off that grows with `failures`; not when the user lost console access
   * or is leaving for the login form.
   */
  async function reopenLater(reopen, failures) {
    try {
      await call('/admin/me');
    } catch (error) {
      if (error instanceof Leaving) return;
      if (error instanceof Refused && error.status === 403) {
        noAccess();
        return;
      }
    }
    setTimeout(reopen, Math.min(30000, 500 * 2 ** Math.min(failures, 6)));
  }

  function noAccess() {
    const main = $('#main');
    main.replaceChildren(
      h('h1', null, 'No console access'),
      h('p', { class: 'notice error', role: 'alert' },
        'This account has no console access: the console is for viewers and operators.'),
      h('p', null, h('button', { type: 'button', class: 'button primary', onclick: logOut }, 'Log in with another account')));
  }

  async function logOut() {
    try {
      await fetch('/console/logout', {
        method: 'POST',
        credentials: 'same-origin',
        headers: { 'X-CSRF-Token': readCookie('console_csrf') },
      });
    } finally {
      location.assign('/console/login');
    }
  }

  // ---- Operator actions ------------------------------------------------------------------------------------------

  /** What the admin API's action results mean, for a person. */
  const RESULTS = {
    requeued: { ok: true, text: 're-driven: attempts reset and queued again' },
    not_stuck: { ok: false, text: 'left alone: finished, or held by a live worker' },
    cancelled: { ok: true, text: 'cancelled' },
    not_pending: { ok: false, text: 'left alone: only a pending order can be cancelled' },
    not_found: { ok: false, text: 'no such order' },
  };

  const resultOf = (entry) => RESULTS[entry.result] || { ok: false, text: String(entry.result || 'unknown') };

  /** What an action did to each order, as a table, after a one-line summary. */
  function outcomeTable(summary, results) {
    const rows = results.map((entry) => {
      const { ok, text } = resultOf(entry);
      return h('tr', { 'data-order': entry.id },
        h('th', { scope: 'row' }, orderLink(entry.id)),
        h('td', null, h('span', { class: ok ? 'ok' : 'no' }, text)),
        h('td', null, entry.status ? statusBadge(entry.status) : '–'));
    });
    return h('div', { class: 'outcome' },
      h('p', { class: 'summary' }, summary),
      tableOf('What became of each order', ['Order', 'Result', 'Status after'], rows));
  }

  /** Per-order results in short: "3 requeued, 1 not stuck". */
  function summarize(results) {
    const counts = new Map();
    for (const entry of results) {
      const key = String(entry.result || 'unknown').replaceAll('_', ' ');
      counts.set(key, (counts.get(key) || 0) + 1);
    }
    return [...counts].map(([key, n]) => `${count(n)} ${key}`).join(', ');
  }

  /** POSTs a re-drive and shows what became of each order in `into`; resolves to the results (null on failure). */
  async function redrive(body, into) {
    into.replaceChildren(h('p', { class: 'muted' }, 'Re-driving…'));
    try {
      const response = await call('/admin/orders/redrive', { method: 'POST', body });
      const action = await response.json();
      const results = action.results || [];
      const queued = results.some((entry) => entry.result === 'requeued')
        ? (action.pushed ? ' Queued now.' : ' The worker queues them within its reconcile interval.')
        : '';
      into.replaceChildren(outcomeTable(`Re-drive: ${summarize(results) || 'no orders'}.${queued}`, results));
      return results;
    } catch (error) {
      if (error instanceof Leaving) throw error;
      into.replaceChildren(h('p', { class: 'notice error', role: 'alert' }, error.message));
      return null;
    }
  }

  /** Asks before an action: a modal dialog (Escape or "Go back" says no). Resolves to a boolean. */
  function confirmAction(title, text, confirmLabel) {
    return new Promise((resolve) => {
      const dialog = h('dialog', { 'aria-labelledby': 'confirm-title', 'aria-describedby': 'confirm-text' },
        h('h2', { id: 'confirm-title' }, title),
        h('p', { id: 'confirm-text' }, text));
      const close = (answer) => {
        dialog.close();
        dialog.remove();
        resolve(answer);
      };
      dialog.append(h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'button primary', onclick: () => close(true) }, confirmLabel),
        h('button', { type: 'button', class: 'button', onclick: () => close(false) }, 'Go back')));
      dialog.addEventListener('cancel', (event) => {
        event.preventDefault();
        close(false);
      });
      document.body.append(dialog);
      dialog.showModal();
    });
  }

  // ---- Lists of orders (search results, parked) -----------------------------------------------------------------

  /** The most orders one action on a search may touch. */
  const ACTION_LIMIT = 1000;

  /** Filters of the console's URL, as the admin API takes them (times as UTC). */
  function apiFilters(params) {
    const filters = new URLSearchParams();
    for (const name of ['id', 'email', 'status', 'parked', 'product', 'created_from', 'created_to']) {
      const value = (params.get(name) || '').trim();
      if (!value) continue;
      if (name === 'created_from' || name === 'created_to') {
        const date = new Date(value);
        filters.set(name, Number.isNaN(date.getTime()) ? value : date.toISOString());
      } else {
        filters.set(name, value);
      }
    }
    return filters;
  }

  /** The search of a re-drive of everything that matches: the filters as JSON. */
  function searchBody(filters) {
    const search = {};
    for (const [name, value] of filters) search[name] = name === 'parked' ? value === 'true' : value;
    return search;
  }

  /** How many orders match `filters`, counted a page at a time up to just past the action limit. */
  // How many orders a search matches (counted up to 10,000).
  async function countMatching(filters) {
    const { body } = await getJson(`/admin/orders/count?${new URLSearchParams(filters)}`);
    return body.more ? body.count + 1 : body.count;
  }

  /**
   * Renders a page of orders from the admin search into `into`, with paging links that keep the console's URL
   * parameters, and for an operator the selection and the re-drive buttons.
   */
  async function orderList(into, params, { caption, empty }) {
    const filters = apiFilters(params);
    const query = new URLSearchParams(filters);
    query.set('limit', params.get('limit') || '50');
    if (params.get('cursor')) query.set('cursor', params.get('cursor'));
    into.replaceChildren(h('p', { class: 'muted', role: 'status' }, 'Loading…'));
    const { body: orders, response } = await getJson(`/admin/orders?${query}`);
    const next = nextLink(response);

    const outcome = h('div', { 'aria-live': 'polite' });
    const selected = new Set();
    const redriveSelected = h('button', { type: 'button', class: 'button primary', disabled: true }, 'Re-drive selected');
    const updateSelection = () => {
      redriveSelected.disabled = selected.size === 0;
      redriveSelected.textContent = selected.size ? `Re-drive selected (${selected.size})` : 'Re-drive selected';
    };
    const boxes = [];
    const rows = orders.map((order) => {
      const cells = [];
      if (canAct()) {
        const box = h('input', { type: 'checkbox', 'aria-label': `Select order ${order.id}`, value: order.id });
        box.addEventListener('change', () => {
          if (box.checked) selected.add(order.id); else selected.delete(order.id);
          updateSelection();
        });
        boxes.push(box);
        cells.push(h('td', { class: 'select' }, box));
      }
      cells.push(
        h('th', { scope: 'row' }, orderLink(order.id)),
        h('td', null, statusBadge(order.status), order.parked_at ? [' ', parkedBadge()] : null),
        h('td', { class: 'wrap' }, order.product_name),
        h('td', { class: 'num' }, money(order.amount)),
        h('td', { class: 'wrap' }, order.user_email || ''),
        h('td', null, time(order.created_at)),
        h('td', { class: 'num' }, count(order.attempts)));
      return h('tr', { 'data-order': order.id }, cells);
    });

    const headings = ['Order', 'Status', 'Product', { text: 'Amount', class: 'num' }, 'Customer', 'Created',
      { text: 'Attempts', class: 'num' }];
    if (canAct()) {
      const all = h('input', { type: 'checkbox', 'aria-label': 'Select every order on this page' });
      all.addEventListener('change', () => {
        for (const box of boxes) {
          box.checked = all.checked;
          if (all.checked) selected.add(box.value); else selected.delete(box.value);
        }
        updateSelection();
      });
      headings.unshift({ node: all, class: 'select', label: 'Select' });
    }

    const parts = [];
    if (canAct() && orders.length) {
      redriveSelected.addEventListener('click', async () => {
        const ids = [...selected];
        if (ids.length > 1 && !(await confirmAction('Re-drive the selected orders?',
          `${count(ids.length)} orders will be queued again with their attempts reset.`, 'Re-drive'))) return;
        await redrive({ ids }, outcome);
      });
      const redriveAll = h('button', { type: 'button', class: 'button' }, 'Re-drive all matching…');
      redriveAll.addEventListener('click', async () => {
        redriveAll.disabled = true;
        try {
          const total = await countMatching(filters);
          if (total > ACTION_LIMIT) {
            outcome.replaceChildren(h('p', { class: 'notice error', role: 'alert' },
              `More than ${count(ACTION_LIMIT)} orders match; one re-drive takes at most ${count(ACTION_LIMIT)}. Narrow the search (a time range, say) and re-drive it in steps.`));
          } else if (total === 0) {
            outcome.replaceChildren(h('p', { class: 'notice' }, 'No order matches this search any more.'));
          } else if (await confirmAction(`Re-drive ${count(total)} ${total === 1 ? 'order' : 'orders'}?`,
            `${count(total)} ${total === 1 ? 'order matches' : 'orders match'} this search. Each one that is pending or stuck will be queued again with its attempts reset; finished orders are left alone.`,
            `Re-drive ${count(total)}`)) {
            await redrive({ search: searchBody(filters) }, outcome);
          }
        } catch (error) {
          if (error instanceof Leaving) return;
          outcome.replaceChildren(h('p', { class: 'notice error' }, error.message));
        } finally {
          redriveAll.disabled = false;
        }
      });
      parts.push(h('div', { class: 'actions', role: 'group', 'aria-label': 'Actions on orders' }, redriveSelected, redriveAll));
    }

    if (orders.length) {
      const more = next ? ', newest first; more on the next page' : ', newest first';
      parts.push(h('p', { role: 'status' }, `${count(orders.length)} ${orders.length === 1 ? 'order' : 'orders'}${more}.`));
      parts.push(tableOf(caption, headings, rows));
    } else {
      parts.push(h('p', { class: 'notice', role: 'status' }, empty));
    }

    const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
    if (params.get('cursor')) {
      const first = new URLSearchParams(params);
      first.delete('cursor');
      pager.append(h('a', { href: `${location.pathname}?${first}` }, 'First page'));
    }
    if (next && next.searchParams.get('cursor')) {
      const later = new URLSearchParams(params);
      later.set('cursor', next.searchParams.get('cursor'));
      pager.append(h('a', { href: `${location.pathname}?${later}`, rel: 'next' }, 'Next page'));
    }
    if (pager.childElementCount) parts.push(pager);
    parts.push(outcome);
    into.replaceChildren(...parts);
  }

  // ---- Screens ---------------------------------------------------------------------------------------------------

  const screens = {
    overview,
    workers,
    orders,
    order,
    parked,
    audit,
  };

  // Overview: figures and the chart, live from /admin/overview/events.
  async function overview() {
    const live = $('#live');
    const setState = (state, text) => {
      live.dataset.state = state;
      live.textContent = text;
    };
    const figures = {};
    const figure = (list, key, label, href) => {
      if (!figures[key]) {
        const value = h('dd', { id: `stat-${key}` }, '–');
        const term = h('dt', null, href ? h('a', { href }, label) : label);
        list.append(h('div', { class: 'card' }, term, value));
        figures[key] = value;
      }
      return figures[key];
    };
    const set = (list, key, label, text, href) => {
      const node = figure(list, key, label, href);
      if (node.textContent !== text) node.textContent = text;
    };

    let lastMinutes = [];
    // The chart is drawn at the width it is shown at, so that its text keeps its size on a phone as on a laptop.
    let drawnWidth = 0;
    new ResizeObserver(() => {
      const width = $('#throughput-chart').clientWidth;
      if (width === drawnWidth) return;
      drawnWidth = width;
      if (lastMinutes.length) chart(lastMinutes);
    }).observe($('#throughput-chart'));

    const render = (data) => {
      const statuses = $('#status-figures');
      const orders = data.orders || {};
      set(statuses, 'pending', 'Pending', count(orders.PENDING));
      set(statuses, 'processing', 'Processing', count(orders.PROCESSING));
      set(statuses, 'completed', 'Completed', count(orders.COMPLETED));
      set(statuses, 'cancelled', 'Cancelled', count(orders.CANCELLED));
      const flow = $('#flow-figures');
      set(flow, 'parked', 'Parked', count(data.parked), '/console/parked');
      const backlog = data.backlog || {};
      set(flow, 'backlog-postgres', 'Waiting in PostgreSQL', count(backlog.postgres));
      set(flow, 'backlog-redis', 'Waiting in Redis', backlog.redis === null ? 'no answer' : count(backlog.redis));
      set(flow, 'oldest-pending', 'Oldest pending', backlog.oldest_pending_at ? ago(backlog.oldest_pending_at) : 'none');
      const latency = data.latency_ms || {};
      set(flow, 'latency-p50', 'Create to complete, p50', duration(latency.p50));
      set(flow, 'latency-p99', 'Create to complete, p99', duration(latency.p99));
      lastMinutes = data.completed_per_minute || [];
      chart(lastMinutes);
      if (data.as_of) $('#as-of').replaceChildren('as of ', time(data.as_of));
    };

    try {
      render((await getJson('/admin/overview')).body);
    } catch (error) {
      if (error instanceof Leaving) return;
      showProblem(error);
    }

    // EventSource reconnects by itself after a dropped connection. It gives up on an answer other than 200 (a 401
    // once the access token has expired): then the session is renewed (call() does it) and a new one is opened,
    // waiting longer after each failure in a row.
    let failures = 0;
    const open = () => {
      const stream = new EventSource('/admin/overview/events');
      stream.addEventListener('open', () => {
        failures = 0;
        clearProblem();
        setState('live', 'Live');
      });
      stream.addEventListener('overview', (event) => {
        try {
          render(JSON.parse(event.data));
        } catch (error) {
          showProblem(error);
        }
      });
      stream.addEventListener('error', async () => {
        setState('reconnecting', 'Reconnecting…');
        if (stream.readyState !== EventSource.CLOSED) return;
        stream.close();
        failures += 1;
        await reopenLater(open, failures);
      });
    };
    open();
  }

  /** The completed-per-minute chart: one bar a minute, the current minute (still counting) last. */
  function chart(buckets) {
    const values = buckets.map((bucket) => (typeof bucket === 'number' ? bucket : bucket.completed || 0));
    const minutes = buckets.map((bucket) => (typeof bucket === 'number' ? null : bucket.minute));
    const total = values.reduce((sum, value) => sum + value, 0);
    const peak = Math.max(0, ...values);
    const current = values.length ? values[values.length - 1] : 0;
    const summary = `${count(total)} completed in the last hour; ${count(current)} so far this minute; at most ${count(peak)} in one minute.`;
    const summaryNode = $('#throughput-summary');
    if (summaryNode.textContent !== summary) summaryNode.textContent = summary;

    const box = $('#throughput-chart');
    const style = getComputedStyle(box);
    const inner = box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const width = Math.max(240, Math.round(inner));
    const height = width < 500 ? 160 : 200;
    const left = 40;
    const bottom = 24;
    const top = 10;
    const plotHeight = height - bottom - top;
    const scale = niceCeiling(peak);
    const slot = (width - left) / Math.max(values.length, 60);
    const grid = [0, scale / 2, scale].map((value) => {
      const y = top + plotHeight - (value / scale) * plotHeight;
      return [
        svg('line', { class: 'grid', x1: left, x2: width, y1: y, y2: y }),
        svg('text', { class: 'axis', x: left - 6, y: y + 4, 'text-anchor': 'end' }, count(value)),
      ];
    });
    const bars = values.map((value, i) => {
      const barHeight = (value / scale) * plotHeight;
      const label = minutes[i] ? minuteFormat.format(new Date(minutes[i])) : `${values.length - 1 - i} min ago`;
      return svg('rect', {
        class: i === values.length - 1 ? 'bar now' : 'bar',
        x: left + i * slot + 1,
        y: top + plotHeight - barHeight,
        width: Math.max(1, slot - 2),
        height: Math.max(0, barHeight),
      }, svg('title', null, `${label}: ${count(value)} completed`));
    });
    const axis = [
      svg('text', { class: 'axis', x: left, y: height - 6 }, '60 min ago'),
      svg('text', { class: 'axis', x: left + (width - left) / 2, y: height - 6, 'text-anchor': 'middle' }, '30 min ago'),
      svg('text', { class: 'axis', x: width, y: height - 6, 'text-anchor': 'end' }, 'now'),
    ];
    const picture = svg('svg', {
      viewBox: `0 0 ${width} ${height}`,
      width,
      height,
      role: 'img',
      'aria-label': `Completed orders per minute over the last hour. ${summary}`,
      preserveAspectRatio: 'xMidYMid meet',
    }, grid, bars, axis);
    box.replaceChildren(picture);
  }

  /** A round number at least `value` (and at least 1) for the top of the chart's scale. */
  function niceCeiling(value) {
    if (value <= 1) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * magnitude >= value) return step * magnitude;
    }
    return 10 * magnitude;
  }

  // Workers: the processes running now.
  async function workers() {
    const load = async () => {
      const into = $('#workers');
      try {
        const { body } = await getJson('/admin/workers');
        const list = Array.isArray(body) ? body : [];
        $('#as-of').replaceChildren('as of ', time(new Date().toISOString()));
        if (!list.length) {
          into.replaceChildren(h('p', { class: 'notice' }, 'No worker is running: orders wait in PostgreSQL until one starts.'));
          return;
        }
        const rows = list.map((worker) => h('tr', null,
          h('th', { scope: 'row', class: 'mono' }, worker.id),
          h('td', null, worker.host),
          h('td', null, time(worker.started_at)),
          h('td', null, time(worker.last_heartbeat), ' ', h('span', { class: 'muted' }, `(${ago(worker.last_heartbeat)})`)),
          h('td', { class: 'num' }, count(worker.in_flight)),
          h('td', { class: 'num' }, count(worker.done))));
        into.replaceChildren(
          h('p', null, `${count(list.length)} ${list.length === 1 ? 'worker' : 'workers'} running.`),
          tableOf('Workers', ['Worker', 'Host', 'Started', 'Last heartbeat', { text: 'Jobs in flight', class: 'num' },
            { text: 'Orders done', class: 'num' }], rows));
      } catch (error) {
        if (error instanceof Leaving) return;
        showProblem(error);
      }
    };
    $('#reload').addEventListener('click', load);
    await load();
  }

  // Orders: the search form, its results, paging and actions.
  async function orders() {
    const params = new URLSearchParams(location.search);
    const form = $('#search');
    for (const field of form.elements) {
      if (!field.name || !params.has(field.name)) continue;
      if (field.type === 'checkbox') field.checked = params.get(field.name) === field.value;
      else field.value = params.get(field.name);
    }
    // Empty fields stay out of the URL, so that it reads as the search it is.
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      if (!form.reportValidity()) return;
      const query = new URLSearchParams();
      for (const field of form.elements) {
        if (!field.name) continue;
        if (field.type === 'checkbox' ? field.checked : field.value.trim() !== '') {
          query.set(field.name, field.type === 'checkbox' ? field.value : field.value.trim());
        }
      }
      location.assign(`/console/orders${query.toString() ? `?${query}` : ''}`);
    });
    try {
      await orderList($('#results'), params, { caption: 'Orders found', empty: 'No order matches this search.' });
    } catch (error) {
      if (error instanceof Leaving) return;
      $('#results').replaceChildren();
      showProblem(error);
    }
  }

  // Parked orders: the search for parked orders, with its actions.
  async function parked() {
    const params = new URLSearchParams(location.search);
    params.set('parked', 'true');
    try {
      await orderList($('#results'), params, { caption: 'Parked orders', empty: 'No order is parked.' });
    } catch (error) {
      if (error instanceof Leaving) return;
      $('#results').replaceChildren();
      showProblem(error);
    }
  }

  // One order: its fields, its timeline and its actions.
  async function order() {
    const id = decodeURIComponent(location.pathname.split('/').pop());

    const load = async () => {
      const [{ body }, { body: actions }] = await Promise.all([
        getJson(`/admin/orders/${encodeURIComponent(id)}`),
        getJson(`/admin/audit?${new URLSearchParams({ order_id: id, limit: '100' })}`),
      ]);
      render(body, actions);
      return body;
    };

    const render = (detail, actions) => {
      $('#page-title').textContent = `Order ${detail.id}`;
      document.title = `Order ${detail.id} · Orders console`;
      const row = (term, ...value) => [h('dt', null, term), h('dd', null, ...value)];
      const search = (name, value) => h('a', { href: `/console/orders?${new URLSearchParams({ [name]: value })}` }, value);
      $('#order').replaceChildren(h('dl', { class: 'details', id: 'order-details' },
        row('Status', h('span', { id: 'order-status' }, statusBadge(detail.status)), detail.parked_at ? [' ', parkedBadge()] : null),
        row('Product', detail.product_name),
        row('Amount', money(detail.amount)),
        row('Customer', detail.user_email ? search('email', detail.user_email) : '–'),
        row('Created', time(detail.created_at)),
        row('Updated', time(detail.updated_at)),
        row('Attempts', count(detail.attempts)),
        row('Queued at', time(detail.enqueued_at)),
        row('Held by', detail.locked_by ? h('span', { class: 'mono' }, detail.locked_by) : '–'),
        row('Lease until', time(detail.lease_until)),
        row('Parked at', time(detail.parked_at)),
        row('Last error', detail.last_error ? h('span', { class: 'mono' }, detail.last_error) : '–')));

      const events = [{ at: detail.created_at, title: 'Created' }];
      for (const change of detail.timeline || []) {
        events.push({ at: change.changed_at, status: change.status, by: change.changed_by });
      }
      if (detail.parked_at) {
        events.push({ at: detail.parked_at, title: 'Parked', text: detail.last_error || 'out of attempts' });
      }
      // Re-drives from the audit log (an operator's cancel is on the timeline already, as its status change).
      for (const action of actions || []) {
        if (action.action !== 'redrive') continue;
        const outcome = (action.result || []).find((entry) => entry.id === detail.id);
        events.push({ at: action.at, title: 'Re-driven', text: outcome ? outcome.result.replace('_', ' ') : '', by: action.actor_email });
      }
      events.sort((a, b) => new Date(a.at) - new Date(b.at));
      $('#timeline').replaceChildren(...events.map((event) => h('li', null,
        h('strong', null, event.status ? statusBadge(event.status) : event.title),
        event.text ? [' ', event.text] : null,
        event.by ? [' ', h('span', { class: 'muted' }, 'by '), h('span', { class: 'mono' }, event.by)] : null,
        h('span', { class: 'when' }, time(event.at)))));

      const unfinished = detail.status === 'PENDING' || detail.status === 'PROCESSING';
      if (canAct() && unfinished) {
        const buttons = [h('button', { type: 'button', class: 'button primary', id: 'redrive', onclick: onRedrive }, 'Re-drive')];
        if (detail.status === 'PENDING') {
          buttons.push(h('button', { type: 'button', class: 'button danger', id: 'cancel', onclick: onCancel }, 'Cancel order'));
        }
        $('#action-buttons').replaceChildren(...buttons);
        $('#actions').hidden = false;
      } else if (!$('#outcome').childElementCount) {
        $('#actions').hidden = true;
      } else {
        $('#action-buttons').replaceChildren();
      }
      unfinishedNow = unfinished;
      if (unfinished) follow(); else stopFollowing();
    };

    // While the order is unfinished the page follows it live (/admin/orders/{id}/events): each change reloads it.
    let stream = null;
    let failures = 0;
    let unfinishedNow = false;
    let reloading = false;
    let reloadAgain = false;
    async function reload() {
      if (reloading) {
        reloadAgain = true;
        return;
      }
      reloading = true;
      do {
        reloadAgain = false;
        try {
          await load();
        } catch (error) {
          if (!(error instanceof Leaving)) showProblem(error);
        }
      } while (reloadAgain);
      reloading = false;
    }
    function follow() {
      if (stream || !unfinishedNow) return;
      const source = new EventSource(`/admin/orders/${encodeURIComponent(id)}/events`);
      stream = source;
      $('#following').textContent = 'Live: following this order until it finishes.';
      source.addEventListener('open', () => { failures = 0; });
      source.addEventListener('status', () => { reload(); });
      source.addEventListener('error', async () => {
        // The browser reconnects by itself (with Last-Event-ID) unless the answer closed the stream.
        if (source.readyState !== EventSource.CLOSED || stream !== source) return;
        stopFollowing();
        // 204 (finished), or a token refused: where does the order stand?
        await reload();
        if (!unfinishedNow) return;
        failures += 1;
        await reopenLater(follow, failures);
      });
    }
    function stopFollowing() {
      if (stream) stream.close();
      stream = null;
      $('#following').textContent = '';
    }

    async function onRedrive() {
      const outcomes = await redrive({ ids: [id] }, $('#outcome'));
      if (outcomes) await reload();
    }

    async function onCancel() {
      if (!(await confirmAction('Cancel this order?', 'A cancelled order is never processed. This cannot be undone.', 'Cancel order'))) return;
      const into = $('#outcome');
      try {
        const response = await call(`/admin/orders/${encodeURIComponent(id)}/cancel`, { method: 'POST' });
        const results = (await response.json()).results || [];
        into.replaceChildren(outcomeTable(`Cancel: ${summarize(results)}.`, results));
      } catch (error) {
        if (error instanceof Leaving) return;
        into.replaceChildren(h('p', { class: 'notice error' }, error.message));
      }
      await reload();
    }

    $('#reload').addEventListener('click', async () => {
      clearProblem();
      await reload();
    });
    try {
      await load();
    } catch (error) {
      if (error instanceof Leaving) return;
      if (error instanceof Refused && error.status === 404) {
        $('#order').replaceChildren(h('p', { class: 'notice' }, 'No order has this id.'));
        return;
      }
      showProblem(error);
    }
  }

  // Audit log: newest first, a page at a time.
  async function audit() {
    const params = new URLSearchParams(location.search);
    const query = new URLSearchParams({ limit: params.get('limit') || '50' });
    if (params.get('cursor')) query.set('cursor', params.get('cursor'));
    const into = $('#results');
    try {
      const { body, response } = await getJson(`/admin/audit?${query}`);
      const entries = Array.isArray(body) ? body : [];
      if (!entries.length) {
        into.replaceChildren(h('p', { class: 'notice' }, 'No operator has acted yet.'));
        return;
      }
      const rows = entries.map((entry) => {
        const ids = entry.order_ids || [];
        const outcomes = Array.isArray(entry.result) ? entry.result : [];
        return h('tr', null,
          h('td', null, time(entry.at)),
          h('td', { class: 'wrap' }, entry.actor_email),
          h('th', { scope: 'row' }, entry.action),
          h('td', null,
            ids.slice(0, 3).map((orderId, i) => [i ? ', ' : '', orderLink(orderId)]),
            ids.length > 3 ? ` and ${count(ids.length - 3)} more` : ''),
          h('td', { class: 'wrap' }, h('code', null, requestText(entry.request))),
          h('td', null, outcomes.length ? summarize(outcomes) : ''));
      });
      const parts = [tableOf('Audit log', ['When', 'Who', 'Action', 'Orders', 'Request', 'Result'], rows)];
      const next = nextLink(response);
      const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
      if (params.get('cursor')) pager.append(h('a', { href: '/console/audit' }, 'Newest'));
      if (next && next.searchParams.get('cursor')) {
        const later = new URLSearchParams(params);
        later.set('cursor', next.searchParams.get('cursor'));
        pager.append(h('a', { href: `/console/audit?${later}`, rel: 'next' }, 'Older entries'));
      }
      if (pager.childElementCount) parts.push(pager);
      into.replaceChildren(...parts);
    } catch (error) {
      if (error instanceof Leaving) return;
      showProblem(error);
    }
  }

  function requestText(request) {
    if (!request || typeof request !== 'object') return '';
    if (Array.isArray(request.ids)) return `${count(request.ids.length)} ${request.ids.length === 1 ? 'order' : 'orders'} by id`;
    if (request.id) return 'one order by id';
    if (request.search) {
      const filters = Object.entries(request.search).map(([key, value]) => `${key}=${value}`);
      return `search ${filters.join(' ') || '(every order)'}`;
    }
    return JSON.stringify(request);
  }

  // ---- Start -----------------------------------------------------------------------------------------------------

  document.addEventListener('DOMContentLoaded', async () => {
    $('#logout').addEventListener('click', logOut);
    try {
      await whoAmI();
    } catch (error) {
      showProblem(error);
      return;
    }
    const screen = screens[page];
    if (screen) await screen();
  });
})();
