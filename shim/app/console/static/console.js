// The operator console: polls /console/api/overview with the admin key, changes the
// cutover through /api/v1/admin/cutover, and tails a channel with centrifuge-js.

import { drawChart } from './chart.js';

const KEY_STORAGE = 'dex-shim-console-admin-key';
const POLL_MS = 1000;
// The chart spans the history kept, at least CHART_MIN_MS, at most CHART_WINDOW_MS.
const CHART_WINDOW_MS = 5 * 60 * 1000;
const CHART_MIN_MS = 30 * 1000;
const TAIL_MAX_LINES = 500;
const TAIL_MAX_CHARS = 2000;
const SERIES = [
  { name: 'legacy', color: '#f0a040' },
  { name: 'channels', color: '#4ea1ff' },
];

const $ = (id) => document.getElementById(id);

const state = {
  key: null,
  pollTimer: null,
  samples: [],
  cutoverDirty: false,
  centrifuge: null,
  subscription: null,
};

class Unauthorized extends Error {}

// -- HTTP ---------------------------------------------------------------------------

async function api(path, { method = 'GET', body, key = state.key } = {}) {
  const headers = { 'X-Admin-Key': key };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
  });
  if (response.status === 401) throw new Unauthorized('admin key rejected');
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(payload.error || `HTTP ${response.status}`);
  return payload;
}

// -- DOM helpers (text only: nothing from the server is parsed as markup) ------------

function row(cells) {
  const tr = document.createElement('tr');
  for (const { text, num } of cells) {
    const td = document.createElement('td');
    td.textContent = String(text);
    if (num) td.className = 'num';
    tr.append(td);
  }
  return tr;
}

function fillTable(tbody, rows, empty) {
  if (!rows.length) {
    const tr = row([{ text: empty }]);
    tr.firstChild.colSpan = tbody.closest('table').tHead.rows[0].cells.length;
    tr.className = 'empty';
    tbody.replaceChildren(tr);
    return;
  }
  tbody.replaceChildren(...rows.map(row));
}

function setPollStatus(text, ok) {
  const pill = $('poll-status');
  pill.textContent = text;
  pill.classList.toggle('ok', ok);
  pill.classList.toggle('bad', !ok);
}

// -- login ----------------------------------------------------------------------------

function showLogin(message = '') {
  stopPolling();
  stopTail();
  if (state.centrifuge) {
    state.centrifuge.disconnect();
    state.centrifuge = null;
  }
  state.key = null;
  sessionStorage.removeItem(KEY_STORAGE);
  $('dashboard').hidden = true;
  $('bar-info').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message;
  $('admin-key').value = '';
  $('admin-key').focus();
}

function showDashboard(key, first) {
  state.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
  $('login').hidden = true;
  $('dashboard').hidden = false;
  $('bar-info').hidden = false;
  render(first);
  schedulePoll();
}

async function onLogin(event) {
  event.preventDefault();
  const key = $('admin-key').value.trim();
  $('login-error').textContent = '';
  try {
    showDashboard(key, await api('/console/api/overview', { key }));
  } catch (error) {
    $('login-error').textContent =
      error instanceof Unauthorized ? 'That key was rejected.' : `Cannot reach the server: ${error.message}`;
  }
}

// -- polling and rendering ----------------------------------------------------------

function schedulePoll() {
  stopPolling();
  state.pollTimer = setTimeout(poll, POLL_MS);
}

function stopPolling() {
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
}

async function poll() {
  try {
    render(await api('/console/api/overview'));
    setPollStatus(`live ${new Date().toLocaleTimeString()}`, true);
  } catch (error) {
    if (error instanceof Unauthorized) {
      showLogin('The admin key is no longer accepted; sign in again.');
      return;
    }
    setPollStatus('server unreachable', false);
  }
  if (state.key) schedulePoll();
}

function render(view) {
  $('node-name').textContent = view.node;
  $('engine-name').textContent = view.engine;
  $('count-legacy').textContent = view.totals.legacy;
  $('count-channels').textContent = view.totals.channels;
  $('count-channel-names').textContent = view.channels.count;

  const now = Date.now();
  state.samples.push({ t: now, values: { ...view.totals } });
  while (state.samples.length && state.samples[0].t < now - CHART_WINDOW_MS) state.samples.shift();
  redrawChart();

  const nodes = Object.entries(view.nodes).sort(([a], [b]) => a.localeCompare(b));
  fillTable(
    $('nodes-body'),
    nodes.map(([name, counts]) => [
      { text: name === view.node ? `${name} (this node)` : name },
      { text: counts.legacy ?? 0, num: true },
      { text: counts.channels ?? 0, num: true },
    ]),
    'no live nodes',
  );
  $('nodes-error').hidden = !view.nodes_error;
  $('nodes-error').textContent = view.nodes_error || '';
  fillTable(
    $('top-body'),
    view.channels.top.map((c) => [{ text: c.channel }, { text: c.subscribers, num: true }]),
    'no channels with subscribers',
  );
  $('slow-legacy').textContent = view.slow_disconnects.legacy;
  $('slow-channels').textContent = view.slow_disconnects.channels;
  fillTable(
    $('disconnects-body'),
    view.disconnects.map((d) => [
      { text: d.protocol },
      { text: d.code, num: true },
      { text: d.count, num: true },
    ]),
    'none since start',
  );
  renderCutover(view.cutover);
}

function redrawChart() {
  const { samples } = state;
  const span = samples.length ? samples[samples.length - 1].t - samples[0].t : 0;
  drawChart($('chart'), samples, SERIES, Math.min(CHART_WINDOW_MS, Math.max(CHART_MIN_MS, span)));
}

// -- cutover ----------------------------------------------------------------------------

function renderCutover(cutover) {
  const current = $('cutover-current');
  current.textContent = cutover.mode;
  current.dataset.mode = cutover.mode;
  $('cutover-version').textContent = cutover.version;
  if (state.cutoverDirty) return; // never overwrite what the operator is typing
  $('cutover-mode').value = cutover.mode;
  $('cutover-percent').value = cutover.channels_percent;
  $('cutover-allow').value = cutover.allow_users.join('\n');
  $('cutover-deny').value = cutover.deny_users.join('\n');
  $('cutover-drain').value = cutover.drain_seconds;
  updateWarning();
}

function userList(text) {
  return [...new Set(text.split(/[\s,]+/).filter(Boolean))];
}

function updateWarning() {
  $('cutover-warning').hidden = $('cutover-mode').value !== 'channels';
}

async function onApply(event) {
  event.preventDefault();
  const result = $('cutover-result');
  const changes = {
    mode: $('cutover-mode').value,
    channels_percent: Number($('cutover-percent').value),
    allow_users: userList($('cutover-allow').value),
    deny_users: userList($('cutover-deny').value),
    drain_seconds: Number($('cutover-drain').value),
  };
  $('cutover-apply').disabled = true;
  result.className = '';
  result.textContent = 'applying...';
  try {
    const report = await api('/api/v1/admin/cutover', { method: 'POST', body: changes });
    state.cutoverDirty = false;
    renderCutover(report.cutover);
    result.className = 'ok';
    result.textContent = `Applied: mode ${report.cutover.mode}, version ${report.cutover.version}.`;
  } catch (error) {
    if (error instanceof Unauthorized) return showLogin('The admin key is no longer accepted.');
    result.className = 'error';
    result.textContent = `Not applied: ${error.message}`;
  } finally {
    $('cutover-apply').disabled = false;
  }
}

// -- live tail ----------------------------------------------------------------------

function socketUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/connection/websocket`;
}

function client() {
  if (!state.centrifuge) {
    // The admin key is no WebSocket login: it buys a short-lived console credential,
    // fetched again by the SDK whenever the connection nears its expiry.
    const getToken = async () => {
      try {
        return (await api('/console/api/token', { method: 'POST' })).token;
      } catch (error) {
        if (error instanceof Unauthorized) throw new globalThis.Centrifuge.UnauthorizedError();
        throw error;
      }
    };
    state.centrifuge = new globalThis.Centrifuge(socketUrl(), { getToken, name: 'dex-shim-console' });
    state.centrifuge.on('disconnected', (ctx) => setTailStatus(`socket closed: ${ctx.reason} (${ctx.code})`));
    state.centrifuge.on('error', (ctx) => setTailStatus(`socket error: ${ctx.error.message}`));
    state.centrifuge.connect();
  }
  return state.centrifuge;
}

function setTailStatus(text) {
  $('tail-status').textContent = text;
}

function stopTail() {
  const sub = state.subscription;
  state.subscription = null;
  if (sub) {
    sub.removeAllListeners();
    sub.unsubscribe();
    state.centrifuge.removeSubscription(sub);
  }
  setTailStatus('not subscribed');
}

function appendLine(channel, ctx) {
  const list = $('tail-lines');
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  const li = document.createElement('li');
  const time = document.createElement('time');
  time.textContent = new Date().toLocaleTimeString(undefined, { hour12: false }) +
    `.${String(Date.now() % 1000).padStart(3, '0')}`;
  const where = document.createElement('span');
  where.className = 'where';
  where.textContent = ctx.offset ? `${channel} #${ctx.offset}` : channel;
  const data = document.createElement('code');
  let text = JSON.stringify(ctx.data);
  if (text.length > TAIL_MAX_CHARS) text = `${text.slice(0, TAIL_MAX_CHARS)}...`;
  data.textContent = text;
  data.title = text; // the whole line on hover when it is cut at the card's edge
  li.append(time, where, data);
  list.append(li);
  while (list.childElementCount > TAIL_MAX_LINES) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function onTail(event) {
  event.preventDefault();
  const channel = $('tail-channel').value.trim();
  if (!channel) return;
  stopTail();
  const centrifuge = client();
  const sub = centrifuge.newSubscription(channel);
  state.subscription = sub;
  sub.on('subscribing', () => setTailStatus(`subscribing to ${channel}...`));
  sub.on('subscribed', () => setTailStatus(`tailing ${channel}`));
  sub.on('unsubscribed', (ctx) => {
    if (state.subscription === sub) setTailStatus(`unsubscribed from ${channel}: ${ctx.reason} (${ctx.code})`);
  });
  sub.on('error', (ctx) => setTailStatus(`${channel}: ${ctx.error.message}`));
  sub.on('publication', (ctx) => appendLine(channel, ctx));
  sub.subscribe();
}

// -- start ----------------------------------------------------------------------------

function init() {
  $('login-form').addEventListener('submit', onLogin);
  $('logout').addEventListener('click', () => showLogin());
  $('cutover-form').addEventListener('submit', onApply);
  $('cutover-form').addEventListener('input', () => {
    state.cutoverDirty = true;
    updateWarning();
  });
  $('cutover-reset').addEventListener('click', () => {
    state.cutoverDirty = false;
    $('cutover-result').textContent = '';
    poll();
  });
  $('tail-form').addEventListener('submit', onTail);
  $('tail-stop').addEventListener('click', stopTail);
  $('tail-clear').addEventListener('click', () => $('tail-lines').replaceChildren());
  window.addEventListener('resize', redrawChart);

  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (!saved) return showLogin();
  api('/console/api/overview', { key: saved })
    .then((view) => showDashboard(saved, view))
    .catch((error) => showLogin(error instanceof Unauthorized ? '' : `Cannot reach the server: ${error.message}`));
}

init();
