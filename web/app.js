// The operator page: one WebSocket feed (snapshot, then deltas) drives every view; the HTTP API
// is used for actions and for lists the feed does not carry (order history, configuration).
// No framework and no build step: the hub serves this file as it is.
'use strict';

const ROW_H = 34;
const SEVERITY_RANK = { critical: 3, major: 2, minor: 1 };
const KEY_STORE = 'cabinet-hub.key';
const MAX_ORDERS = 300;
const MAX_SESSIONS = 300;
const MAX_EVENTS = 40;

const S = {
  key: null,
  me: null,
  ws: null,
  lastSeq: null,
  backoff: 500,
  retryTimer: null,
  everLive: false,
  cabinets: new Map(),
  sessions: new Map(),
  orders: new Map(),
  abnormal: new Map(),
  exceptions: new Map(),
  settlements: new Map(),
  expiring: new Map(),
  events: new Map(),
  tab: 'fleet',
  filter: 'all',
  search: '',
  sort: 'severity',
  view: [],
  detail: null,
  dirty: { fleet: true, alerts: true, sessions: true, abnormal: true, exceptions: true, settlements: true, detail: true },
  frame: 0,
  lastFleetCompute: 0,
};

const $ = (id) => document.getElementById(id);

// Builds an element; strings become text nodes, so nothing from the wire is parsed as markup.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const fen = (n) => (n === null || n === undefined ? '–' : '¥' + (n / 100).toFixed(2));
function when(t) {
  if (t === null || t === undefined) return '–';
  const d = new Date(t);
  return isNaN(d) ? String(t) : d.toLocaleString();
}
function clock(t) {
  const d = new Date(t);
  return isNaN(d) ? '' : d.toLocaleTimeString();
}

// ---- HTTP ----------------------------------------------------------------------------------

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: 'Bearer ' + S.key } };
  if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401) {
    signOut('Your key was refused (401). Sign in again.');
    throw new Error('unauthorized');
  }
  if (!r.ok) {
    const msg = (data && (data.message || data.error || data.code)) || r.statusText;
    const err = new Error(`${r.status}: ${msg}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

function banner(msg) {
  const b = $('banner');
  b.textContent = msg;
  b.hidden = !msg;
  if (msg) setTimeout(() => { if (b.textContent === msg) b.hidden = true; }, 8000);
}

function explain(e) {
  if (e.status === 403) return 'Your key may not do this (403): an operator key is needed.';
  return e.message;
}

// ---- sign-in ---------------------------------------------------------------------------------

async function signIn(key, remember) {
  S.key = key;
  let me;
  try {
    me = await api('GET', '/api/v1/me');
  } catch (e) {
    S.key = null;
    $('signin-error').textContent = e.message === 'unauthorized' ? 'Unknown key.' : 'Cannot reach the hub: ' + e.message;
    return;
  }
  S.me = me;
  (remember ? localStorage : sessionStorage).setItem(KEY_STORE, key);
  $('signin').hidden = true;
  $('app').hidden = false;
  $('who').textContent = `${me.role}${me.merchant_id ? ' · ' + me.merchant_id : ' · platform'}`;
  // A merchant's key has one merchant's bills; the platform names one.
  $('bill-merchant-label').hidden = Boolean(me.merchant_id);
  connect();
  loadOrders();
  loadExpiring();
  loadReadiness();
  $('service-merchant-label').hidden = Boolean(me.merchant_id);
  loadServiceOrders();
}

// A merchant's key sees whether its shoppers can pay: each channel ready, or what the platform
// still has to set up with the provider (sub-merchant number, authorisation, service phone).
const NEEDS = {
  provider: 'no provider credentials on this hub',
  wechat_sub_mchid: 'WeChat sub-merchant number',
  service_phone: 'customer-service phone',
  alipay_smid: 'Alipay sub-merchant id',
  alipay_app_auth_token: 'Alipay authorisation',
};

async function loadReadiness() {
  const box = $('payready');
  if (!S.me || !S.me.merchant_id) { box.hidden = true; return; }
  let v;
  try { v = await api('GET', `/api/v1/merchants/${encodeURIComponent(S.me.merchant_id)}/payment`); } catch (e) { box.hidden = true; return; }
  box.textContent = '';
  for (const [name, label] of [['wechat', 'WeChat Pay'], ['alipay', 'Alipay']]) {
    const r = v.readiness[name];
    const missing = r.missing.map((m) => NEEDS[m] || m).join(', ');
    let text = `${label}: ${r.ready ? 'ready' : 'not ready'}`;
    if (r.simulated) text += ' (simulator)';
    if (missing) text += ` — ${r.ready ? 'a real provider needs' : 'missing'}: ${missing}`;
    box.append(el('span', { class: r.ready ? 'ready' : 'notready', 'data-channel': name, text }));
  }
  box.hidden = false;
}

function signOut(reason) {
  localStorage.removeItem(KEY_STORE);
  sessionStorage.removeItem(KEY_STORE);
  S.key = null;
  if (S.ws) { S.ws.onclose = null; S.ws.close(); S.ws = null; }
  clearTimeout(S.retryTimer);
  S.lastSeq = null;
  S.cabinets.clear(); S.sessions.clear(); S.orders.clear(); S.abnormal.clear(); S.exceptions.clear(); S.settlements.clear(); S.expiring.clear(); S.events.clear();
  $('app').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = reason || '';
}

// ---- the feed --------------------------------------------------------------------------------

function setConn(state, text) {
  const c = $('conn');
  c.dataset.state = state;
  c.textContent = text;
}

// A browser cannot put the key in the socket's Authorization header, and a key in the URL
// would land in logs: the page trades it (in a header) for a single-use ticket first.
async function connect() {
  if (!S.key) return;
  setConn('connecting', S.everLive ? 'reconnecting…' : 'connecting…');
  let ticket;
  try {
    ticket = (await api('POST', '/api/v1/feed-tickets')).ticket;
  } catch (e) {
    if (e.message === 'unauthorized') return;
    scheduleReconnect();
    return;
  }
  if (!S.key) return;
  const proto = location.protocol === 'https:' ? 'wss' : 'ws';
  let url = `${proto}://${location.host}/ws?ticket=${encodeURIComponent(ticket)}`;
  if (S.lastSeq !== null) url += `&since=${S.lastSeq}`;
  const ws = new WebSocket(url);
  S.ws = ws;
  ws.onopen = () => {
    S.backoff = 500;
    S.everLive = true;
    setConn('live', 'live');
  };
  ws.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (_) { return; }
    handle(ev);
  };
  ws.onclose = (ev) => {
    if (S.ws !== ws) return;
    S.ws = null;
    if (ev.code === 4401) {
      signOut('Your key was revoked. Sign in with another key.');
      return;
    }
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  const wait = S.backoff;
  S.backoff = Math.min(S.backoff * 2, 10000);
  let left = Math.ceil(wait / 1000);
  setConn('down', `disconnected — retrying in ${left}s`);
  const tick = setInterval(() => {
    left -= 1;
    if (left > 0 && !S.ws) setConn('down', `disconnected — retrying in ${left}s`);
  }, 1000);
  S.retryTimer = setTimeout(async () => {
    clearInterval(tick);
    // A refused handshake looks like any other close; ask the API whether the key still works.
    try { await api('GET', '/api/v1/me'); } catch (e) { if (e.message === 'unauthorized') return; }
    connect();
  }, wait);
}

function logEvent(cabinetId, text) {
  if (!cabinetId) return;
  let list = S.events.get(cabinetId);
  if (!list) { list = []; S.events.set(cabinetId, list); }
  list.unshift({ at: Date.now(), text });
  if (list.length > MAX_EVENTS) list.length = MAX_EVENTS;
  if (S.detail === cabinetId) S.dirty.detail = true;
}

function describeChange(before, after) {
  if (!before) return 'appeared';
  const parts = [];
  for (const k of ['online', 'door', 'lock', 'light', 'faulted', 'locked_down']) {
    if (before[k] !== after[k] && after[k] !== undefined) parts.push(`${k} ${before[k] ?? '–'} → ${after[k] ?? '–'}`);
  }
  if (before.temp_c !== after.temp_c && after.temp_c !== undefined && Math.abs((before.temp_c ?? 0) - (after.temp_c ?? 0)) >= 0.5) {
    parts.push(`temp ${after.temp_c}°C`);
  }
  const camsOk = (c) => (c.cameras || []).filter((x) => x.ok).length;
  if (camsOk(before) !== camsOk(after)) parts.push(`cameras ok ${camsOk(after)}/${(after.cameras || []).length}`);
  return parts.join(', ');
}

function handle(ev) {
  if (typeof ev.seq === 'number') S.lastSeq = ev.seq;
  const d = ev.data || {};
  switch (ev.type) {
    case 'snapshot': {
      S.cabinets.clear();
      for (const c of d.cabinets || []) S.cabinets.set(c.id, c);
      markAll();
      break;
    }
    case 'cabinet': {
      const before = S.cabinets.get(d.id);
      const text = describeChange(before, d);
      S.cabinets.set(d.id, Object.assign({}, before || {}, d));
      if (text) logEvent(d.id, text);
      markAll();
      break;
    }
    case 'alert': {
      const c = S.cabinets.get(d.cabinet_id);
      const a = d.alert || {};
      if (c) {
        const rest = (c.alerts || []).filter((x) => x.id !== a.id);
        c.alerts = d.state === 'cleared' ? rest : rest.concat([Object.assign({}, a, { acked: a.acked || d.state === 'acked' })]);
      }
      logEvent(d.cabinet_id, `alert ${a.type} ${d.state}`);
      markAll();
      break;
    }
    case 'session': {
      S.sessions.set(d.id, d);
      trim(S.sessions, MAX_SESSIONS);
      logEvent(d.cabinet_id, `session ${d.id.slice(0, 8)} ${d.state}${d.failure ? ' (' + d.failure + ')' : ''}`);
      S.dirty.sessions = true;
      break;
    }
    case 'order': {
      S.orders.set(d.id, d);
      trim(S.orders, MAX_ORDERS);
      if (d.status === 'abnormal') S.abnormal.set(d.id, d); else S.abnormal.delete(d.id);
      logEvent(d.cabinet_id, `order ${d.id.slice(0, 8)} ${d.status}${d.total_fen != null ? ' ' + fen(d.total_fen) : ''}`);
      S.dirty.sessions = true;
      S.dirty.abnormal = true;
      break;
    }
    case 'payment_exception': {
      S.exceptions.set(d.id, d);
      trim(S.exceptions, MAX_ORDERS);
      S.dirty.exceptions = true;
      break;
    }
    case 'service_expiring': {
      S.expiring.set(d.cabinet_id, { id: d.cabinet_id, days: d.days_left });
      renderExpiring();
      break;
    }
    case 'service_order': {
      serviceOrderChanged(d);
      break;
    }
    case 'settlement': {
      // Re-inserted so the most recently changed stay when the map is trimmed.
      S.settlements.delete(d.order_id);
      S.settlements.set(d.order_id, d);
      trim(S.settlements, MAX_ORDERS);
      S.dirty.settlements = true;
      break;
    }
    default:
      break;
  }
  schedule();
}

function trim(map, max) {
  while (map.size > max) map.delete(map.keys().next().value);
}

function markAll() {
  S.dirty.fleet = S.dirty.alerts = S.dirty.detail = true;
}

async function loadOrders() {
  try {
    const [recent, abnormal, exceptions, underway, settlements, failed] = await Promise.all([
      api('GET', '/api/v1/orders?limit=100'),
      api('GET', '/api/v1/orders?status=abnormal&limit=500'),
      api('GET', '/api/v1/payment-exceptions?limit=200'),
      api('GET', '/api/v1/sessions?limit=' + MAX_SESSIONS),
      api('GET', '/api/v1/settlements?limit=200'),
      api('GET', '/api/v1/settlements?state=failed&limit=500'),
    ]);
    // Every failed one, then the most recent; a feed event may already be newer.
    for (const x of [...(failed.items || []), ...(settlements.items || []).slice().reverse()]) {
      if (!S.settlements.has(x.order_id)) S.settlements.set(x.order_id, x);
    }
    // Sessions under way since before the page opened (a stuck one among them).
    for (const x of underway.items || []) if (!S.sessions.has(x.id)) S.sessions.set(x.id, x);
    // Newest first from the API: inserted oldest first, so the newest stay when trimmed.
    for (const x of (exceptions.items || []).slice().reverse()) if (!S.exceptions.has(x.id)) S.exceptions.set(x.id, x);
    // Oldest first, so the newest stay when the map is trimmed; feed events may already be newer.
    for (const o of (recent.items || []).slice().reverse()) if (!S.orders.has(o.id)) S.orders.set(o.id, o);
    for (const o of abnormal.items || []) if (!S.abnormal.has(o.id)) S.abnormal.set(o.id, o);
    S.dirty.sessions = S.dirty.abnormal = S.dirty.exceptions = S.dirty.settlements = true;
    schedule();
  } catch (e) {
    banner('Could not load orders: ' + explain(e));
  }
}

// ---- rendering -------------------------------------------------------------------------------

function schedule() {
  if (S.frame) return;
  S.frame = requestAnimationFrame(render);
}

function render() {
  S.frame = 0;
  if (S.dirty.fleet) {
    // Sorting 10,000 rows on every event would starve the page under an alert storm; at most
    // every 150 ms is still well inside the one-second promise.
    const since = performance.now() - S.lastFleetCompute;
    if (since < 150) {
      setTimeout(schedule, 150 - since);
    } else {
      S.lastFleetCompute = performance.now();
      computeFleet();
      renderCounts();
      renderRows();
      S.dirty.fleet = false;
    }
  }
  if (S.dirty.alerts) { renderAlerts(); S.dirty.alerts = false; }
  if (S.dirty.sessions && S.tab === 'sessions') { renderSessions(); S.dirty.sessions = false; }
  if (S.dirty.abnormal) { renderAbnormal(); S.dirty.abnormal = false; }
  if (S.dirty.exceptions) { renderExceptions(); S.dirty.exceptions = false; }
  // The table only while it is shown (a busy fleet moves a settlement three times an order);
  // the count of failed ones always.
  if (S.dirty.settlements) {
    settlementsCount();
    if (S.tab === 'settlements') { renderSettlements(); S.dirty.settlements = false; }
  }
  if (S.dirty.detail && S.detail) { renderDetail(); S.dirty.detail = false; }
}

function severityOf(c) {
  let s = 0;
  for (const a of c.alerts || []) s = Math.max(s, SEVERITY_RANK[a.severity] || 0);
  return s;
}

function matches(c) {
  switch (S.filter) {
    case 'online': if (!c.online) return false; break;
    case 'offline': if (c.online) return false; break;
    case 'alerting': if (!(c.alerts && c.alerts.length)) return false; break;
    case 'faulted': if (!(c.faulted || c.locked_down)) return false; break;
    case 'session': if (!c.session) return false; break;
    default: break;
  }
  if (S.search) {
    const q = S.search;
    return c.id.toLowerCase().includes(q) || (c.point || '').toLowerCase().includes(q);
  }
  return true;
}

function computeFleet() {
  const view = [];
  for (const c of S.cabinets.values()) if (matches(c)) view.push(c);
  const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  const cmp = {
    severity: (a, b) => severityOf(b) - severityOf(a) || (a.online === b.online ? 0 : a.online ? 1 : -1) || byId(a, b),
    id: byId,
    temp: (a, b) => (b.temp_c ?? -999) - (a.temp_c ?? -999) || byId(a, b),
    seen: (a, b) => String(b.last_seen_at || '').localeCompare(String(a.last_seen_at || '')) || byId(a, b),
  }[S.sort];
  view.sort(cmp);
  S.view = view;
}

function renderCounts() {
  let online = 0, alerting = 0, faulted = 0, session = 0, alerts = 0;
  for (const c of S.cabinets.values()) {
    if (c.online) online++;
    if (c.alerts && c.alerts.length) { alerting++; alerts += c.alerts.filter((a) => !a.acked).length; }
    if (c.faulted || c.locked_down) faulted++;
    if (c.session) session++;
  }
  $('c-total').textContent = S.cabinets.size;
  $('c-online').textContent = online;
  $('c-offline').textContent = S.cabinets.size - online;
  $('c-alerting').textContent = alerting;
  $('c-faulted').textContent = faulted;
  $('c-session').textContent = session;
  $('tab-alerts-count').textContent = alerts ? String(alerts) : '';
  $('shown').textContent = `${S.view.length} shown`;
}

function cabinetRow(c) {
  const cams = c.cameras || [];
  const camsOk = cams.filter((x) => x.ok).length;
  const sev = severityOf(c);
  const sevName = sev === 3 ? 'critical' : sev === 2 ? 'major' : sev === 1 ? 'minor' : '';
  return el('div', { class: 'row' + (sevName ? ' sev-' + sevName : ''), 'data-cabinet': c.id, onclick: () => openDetail(c.id) },
    el('span', { text: c.id, title: c.id }),
    el('span', { text: c.point || '', title: c.point || '' }),
    el('span', {}, el('i', { class: 'dot' + (c.online ? ' on' : '') }), c.online ? 'online' : 'offline'),
    el('span', { class: c.door === 'open' ? 'warn' : '', text: c.door || '–' }),
    el('span', { class: c.lock === 'fault' || c.lock === 'unlocked' ? 'warn' : '', text: c.lock || '–' }),
    el('span', { class: cams.length && camsOk < cams.length ? 'warn' : '', text: cams.length ? `${camsOk}/${cams.length} ok` : '–' }),
    el('span', { text: c.temp_c === null || c.temp_c === undefined ? '–' : `${c.temp_c}°C` }),
    el('span', { text: c.light || '–' }),
    el('span', {}, (c.alerts || []).map((a) => el('span', { class: `badge ${a.severity}${a.acked ? ' acked' : ''}`, text: a.type }))),
    el('span', { text: c.session ? `${c.session.mode} ${c.session.phase}` : '' }),
  );
}

function renderRows() {
  const vp = $('fleet');
  $('fleet-spacer').style.height = `${S.view.length * ROW_H}px`;
  const first = Math.max(0, Math.floor(vp.scrollTop / ROW_H) - 5);
  const count = Math.ceil(vp.clientHeight / ROW_H) + 10;
  const rows = $('fleet-rows');
  rows.style.transform = `translateY(${first * ROW_H}px)`;
  rows.replaceChildren(...S.view.slice(first, first + count).map(cabinetRow));
}

function allAlerts() {
  const out = [];
  for (const c of S.cabinets.values()) for (const a of c.alerts || []) out.push(Object.assign({ cabinet_id: c.id }, a));
  out.sort((a, b) => (SEVERITY_RANK[b.severity] || 0) - (SEVERITY_RANK[a.severity] || 0)
    || (a.acked === b.acked ? 0 : a.acked ? 1 : -1)
    || String(b.raised_at).localeCompare(String(a.raised_at)));
  return out;
}

function alertActions(a) {
  return el('span', {},
    a.acked ? null : el('button', { 'data-action': 'ack', onclick: (e) => { e.stopPropagation(); alertAction(a, 'ack'); }, text: 'Acknowledge' }),
    ' ',
    el('button', { 'data-action': 'clear', onclick: (e) => { e.stopPropagation(); alertAction(a, 'clear'); }, text: 'Clear' }));
}

async function alertAction(a, what) {
  try {
    await api('POST', `/api/v1/alerts/${encodeURIComponent(a.id)}/${what}`);
  } catch (e) {
    banner(`Could not ${what} ${a.type} on ${a.cabinet_id}: ${explain(e)}`);
  }
}

function renderAlerts() {
  const list = allAlerts();
  // An alert storm can raise thousands at once; the newest 500 of the worst are enough to act on.
  const shown = list.slice(0, 500);
  $('alerts').replaceChildren(...shown.map((a) => el('tr', { 'data-alert-id': a.id, 'data-type': a.type, 'data-cabinet': a.cabinet_id, 'data-acked': a.acked ? 'true' : 'false' },
    el('td', {}, el('span', { class: `badge ${a.severity}`, text: a.severity })),
    el('td', { text: a.type }),
    el('td', {}, el('button', { class: 'link', onclick: () => openDetail(a.cabinet_id), text: a.cabinet_id })),
    el('td', { text: when(a.raised_at) }),
    el('td', { text: a.detail || '' }),
    el('td', { text: a.acked ? 'acknowledged' : 'new' }),
    el('td', {}, alertActions(a)))));
  $('alerts-empty').hidden = list.length > 0;
}

function renderSessions() {
  const live = [...S.sessions.values()].reverse();
  $('sessions').replaceChildren(...live.slice(0, 100).map((s) => el('tr', { 'data-session': s.id },
    el('td', { text: s.id.slice(0, 12), title: s.id }),
    el('td', {}, el('button', { class: 'link', onclick: () => openDetail(s.cabinet_id), text: s.cabinet_id })),
    el('td', { text: s.user_id }), el('td', { text: s.channel }), el('td', { text: s.mode }),
    el('td', { class: s.state === 'failed' ? 'warn' : '', text: s.state + (s.failure ? ` (${s.failure})` : '') }),
    el('td', { text: when(s.updated_at) }),
    el('td', {}, UNDERWAY.has(s.state)
      ? el('button', { class: 'link', 'data-close': s.id, onclick: () => askClose(s.id), text: 'Close…' })
      : null))));
  const orders = [...S.orders.values()].sort((a, b) => String(b.updated_at).localeCompare(String(a.updated_at)));
  $('orders').replaceChildren(...orders.slice(0, 100).map(orderRow));
}

function renderExceptions() {
  const list = [...S.exceptions.values()].sort((a, b) => Number(b.created_at) - Number(a.created_at));
  $('tab-exceptions-count').textContent = list.length ? String(list.length) : '';
  $('exceptions').replaceChildren(...list.map((x) => el('tr', { 'data-exception': x.id },
    el('td', { text: when(x.created_at) }), el('td', { text: x.provider }),
    el('td', { class: 'warn', text: x.reason }),
    el('td', { text: x.order_id ? x.order_id.slice(0, 12) : '—', title: x.order_id || '' }),
    el('td', { text: x.notification_id }), el('td', { text: x.detail }))));
  $('exceptions-empty').hidden = list.length > 0;
}

function settlementsCount() {
  let failed = 0;
  for (const x of S.settlements.values()) if (x.state === 'failed') failed += 1;
  $('tab-settlements-count').textContent = failed ? String(failed) : '';
}

function renderSettlements() {
  const list = [...S.settlements.values()].sort((a, b) => Number(b.updated_at) - Number(a.updated_at));
  $('settlements').replaceChildren(...list.map((x) => el('tr', { 'data-settlement': x.order_id },
    el('td', { text: when(x.updated_at) }),
    el('td', { text: x.order_id.slice(0, 12), title: x.order_id }),
    el('td', { class: x.state === 'failed' ? 'warn' : '', text: x.state }),
    el('td', { text: (x.commission_bps / 100).toFixed(2) + ' %' }),
    el('td', { text: fen(x.platform_fen) }), el('td', { text: fen(x.merchant_fen) }),
    el('td', { text: x.returned_fen ? fen(x.returned_fen) : '—' }),
    el('td', { text: x.last_error || '' }),
    el('td', {}, ['pending', 'splitting', 'split', 'failed'].includes(x.state)
      ? el('button', { class: 'link', 'data-retry': x.order_id, onclick: () => retrySettlement(x.order_id), text: 'Retry now' })
      : ''))));
  $('settlements-empty').hidden = list.length > 0;
}

async function retrySettlement(orderId) {
  try {
    const row = await api('POST', `/api/v1/orders/${encodeURIComponent(orderId)}/settlement/retry`, {});
    S.settlements.set(row.order_id, row);
    S.dirty.settlements = true;
    schedule();
  } catch (e) {
    banner('Could not retry the settlement: ' + explain(e));
  }
}

// ---- service time (设备使用时长) ------------------------------------------------------------

async function loadExpiring() {
  try {
    const list = await api('GET', '/api/v1/cabinets?expiring_within_days=30');
    const now = Date.now();
    // The list is the whole answer: a cabinet renewed since leaves the banner.
    S.expiring = new Map();
    for (const c of list.items || []) {
      const end = Date.parse(c.service_expires_at);
      S.expiring.set(c.id, { id: c.id, days: Math.max(0, Math.ceil((end - now) / 86400000)) });
    }
    renderExpiring();
  } catch (e) {
    banner('Could not load service expiry: ' + explain(e));
  }
}

// Who must renew: an expired cabinet refuses shoppers (service_expired).
function renderExpiring() {
  const list = [...S.expiring.values()].sort((a, b) => a.days - b.days);
  const box = $('expiring');
  box.hidden = list.length === 0;
  if (!list.length) { box.replaceChildren(); return; }
  const expired = list.filter((x) => x.days === 0).length;
  box.replaceChildren(
    el('strong', { text: expired ? `${expired} cabinet(s) out of service time — they refuse shoppers. ` : '' }),
    `Service time ends within 30 days for ${list.length} cabinet(s): `,
    ...list.slice(0, 20).map((x) => el('span', { class: 'pill', 'data-expiring': x.id, text: `${x.id} · ${x.days ? x.days + ' d' : 'expired'}` })),
    list.length > 20 ? ` and ${list.length - 20} more` : '',
    ' ', el('button', { class: 'link', id: 'renew', text: 'Renew…', onclick: () => {
      $('service-cabinets').value = list.map((x) => x.id).join(', ');
      showTab('service');
    } }));
}

// ---- service time ----------------------------------------------------------------------------

async function loadServiceOrders() {
  try {
    const v = await api('GET', '/api/v1/service-orders?limit=50');
    S.serviceOrders = new Map(v.items.map((o) => [o.id, o]));
    renderServiceOrders();
  } catch (e) {
    banner('Could not load service orders: ' + explain(e));
  }
}

function renderServiceOrders() {
  const list = [...(S.serviceOrders || new Map()).values()].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  $('service-orders').replaceChildren(...list.map((o) => el('tr', { 'data-service-order': o.id, 'data-status': o.status },
    el('td', { text: when(o.created_at) }), el('td', { text: o.id }),
    el('td', { text: o.cabinet_ids.join(', ') }), el('td', { text: String(o.years) }),
    el('td', { text: fen(o.amount_fen) }), el('td', { text: o.status }),
    el('td', { text: o.transaction_id || o.voucher || '' }))));
  $('service-empty').hidden = list.length > 0;
}

// The feed's word on an order: the list, and the code being paid.
function serviceOrderChanged(d) {
  S.serviceOrders = S.serviceOrders || new Map();
  S.serviceOrders.set(d.id, d);
  renderServiceOrders();
  if (S.paying === d.id && d.status !== 'unpaid') {
    const box = $('service-pay');
    box.dataset.status = d.status;
    $('service-qr').replaceChildren();
    $('service-pay-text').textContent = d.status === 'paid'
      ? `Paid ${fen(d.amount_fen)}: the cabinets serve ${d.years} more year(s).`
      : 'Not paid in time: the order was cancelled. Buy again to pay.';
    S.paying = null;
  }
  if (d.status === 'paid') loadExpiring();
}

async function buyService(e) {
  e.preventDefault();
  const body = {
    cabinet_ids: $('service-cabinets').value.split(/[\s,，]+/).filter(Boolean),
    years: Number($('service-years').value),
  };
  if (!S.me.merchant_id) body.merchant_id = $('service-merchant').value.trim();
  let o;
  try {
    o = await api('POST', '/api/v1/service-orders', body);
  } catch (err) {
    banner('Could not make the order: ' + explain(err));
    return;
  }
  S.serviceOrders = S.serviceOrders || new Map();
  S.serviceOrders.set(o.id, o);
  renderServiceOrders();
  S.paying = o.id;
  const box = $('service-pay');
  box.hidden = false;
  box.dataset.order = o.id;
  box.dataset.status = o.status;
  $('service-pay-text').textContent =
    `Scan with WeChat to pay ${fen(o.amount_fen)} for ${o.cabinet_ids.length} cabinet(s) × ${o.years} year(s), before ${when(o.pay_by)}.`;
  // Fetched with the key (an <img> cannot send it), then shown from memory.
  try {
    const r = await fetch(`/api/v1/service-orders/${encodeURIComponent(o.id)}/qr.svg`, { headers: { Authorization: 'Bearer ' + S.key } });
    if (r.ok && S.paying === o.id) {
      const src = URL.createObjectURL(await r.blob());
      $('service-qr').replaceChildren(el('img', { id: 'service-qr-img', src, alt: 'WeChat Pay code', width: 220, height: 220 }));
    }
  } catch (err) {
    banner('Could not show the code: ' + err.message);
  }
}

// ---- bills and statistics ---------------------------------------------------------------

// The hub's day is local time (+08:00 by default); the browser's is close enough for a default.
function today() {
  const d = new Date();
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')}`;
}

function billMerchant() {
  return (S.me && S.me.merchant_id) || $('bill-merchant').value.trim();
}

async function showBill(e) {
  if (e) e.preventDefault();
  const m = billMerchant(), day = $('bill-date').value;
  if (!m || !day) { banner('Pick a merchant and a day.'); return; }
  const base = `${encodeURIComponent(m)}/${encodeURIComponent(day)}`;
  try {
    const [bill, stats] = await Promise.all([api('GET', `/api/v1/bills/${base}`), api('GET', `/api/v1/stats/${base}`)]);
    renderBill(bill, stats);
    $('bill-download').disabled = false;
  } catch (err) {
    banner('Could not load the bill: ' + explain(err));
  }
}

function renderBill(bill, stats) {
  const t = bill.totals;
  const kv = [
    ['orders', String(t.orders)], ['sales', fen(t.paid_fen)], ['average basket', fen(stats.average_basket_fen)],
    ['list price', fen(t.gross_fen)], ['promotions', fen(t.discount_fen)],
    ['refunded', `${fen(t.refunded_fen)} (${t.refunds})`], ['commission', fen(t.commission_fen)],
    ['commission returned', fen(t.commission_returned_fen)], ['commission pending', fen(t.commission_pending_fen)],
    ['service time', fen(t.service_fen)],
    ['net', fen(t.net_fen)],
  ];
  $('bill-totals').replaceChildren(...kv.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { 'data-total': k, text: v })]));
  $('bill-chart').replaceChildren(hourChart(stats.by_hour));
  $('bill-cabinets').replaceChildren(...stats.cabinets.map((c) => el('tr', { 'data-cabinet-stats': c.cabinet_id },
    el('td', { text: c.cabinet_id }), el('td', { text: String(c.orders) }), el('td', { text: fen(c.sales_fen) }),
    el('td', { text: c.top_products.map((p) => `${p.name} ×${p.qty}`).join(', ') }))));
  $('bill-empty').hidden = true;
}

// Sales by hour as SVG bars: 24 of them, the tallest the day's best hour.
function hourChart(hours) {
  const NS = 'http://www.w3.org/2000/svg';
  const w = 24 * 22, h = 140, max = Math.max(1, ...hours.map((x) => x.sales_fen));
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${h + 16}`);
  svg.setAttribute('class', 'chart');
  svg.setAttribute('role', 'img');
  svg.setAttribute('aria-label', 'sales by hour');
  for (const x of hours) {
    const bh = Math.round((x.sales_fen / max) * h);
    const r = document.createElementNS(NS, 'rect');
    r.setAttribute('x', String(x.hour * 22 + 2));
    r.setAttribute('y', String(h - bh));
    r.setAttribute('width', '18');
    r.setAttribute('height', String(bh));
    r.setAttribute('data-hour', String(x.hour));
    r.setAttribute('fill', 'currentColor');
    const tip = document.createElementNS(NS, 'title');
    tip.textContent = `${String(x.hour).padStart(2, '0')}:00 · ${x.orders} orders · ${fen(x.sales_fen)}`;
    r.append(tip);
    svg.append(r);
    if (x.hour % 3 === 0) {
      const label = document.createElementNS(NS, 'text');
      label.setAttribute('x', String(x.hour * 22 + 2));
      label.setAttribute('y', String(h + 13));
      label.setAttribute('font-size', '10');
      label.textContent = String(x.hour);
      svg.append(label);
    }
  }
  return svg;
}

// The CSV needs the key, so it is fetched here and handed to the browser as a file.
async function downloadBill() {
  const m = billMerchant(), day = $('bill-date').value;
  try {
    const r = await fetch(`/api/v1/bills/${encodeURIComponent(m)}/${encodeURIComponent(day)}?format=csv`, {
      headers: { Authorization: `Bearer ${S.key}` },
    });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const blob = await r.blob();
    const a = el('a', { href: URL.createObjectURL(blob), download: `bill-${m}-${day}.csv`, id: 'bill-file', hidden: true });
    $('bill-file')?.remove();
    document.body.append(a);
    a.click();
  } catch (err) {
    banner('Could not download the bill: ' + explain(err));
  }
}

// A session still under way can be closed by an operator (a shopper gone, a cabinet stuck
// busy). One form above the table, not one per row: the rows are redrawn on every change.
const UNDERWAY = new Set(['confirming', 'unlocking', 'open']);

function askClose(id) {
  $('close-id').textContent = id;
  $('close-msg').textContent = '';
  $('close-form').hidden = false;
  $('close-reason').focus();
}

async function submitClose(e) {
  e.preventDefault();
  const id = $('close-id').textContent;
  const reason = $('close-reason').value.trim();
  if (!id || !reason) return;
  try {
    const v = await api('POST', `/api/v1/sessions/${encodeURIComponent(id)}/close`, { reason });
    $('close-msg').textContent = `closed: ${v.session ? v.session.state : ''}`;
    $('close-reason').value = '';
    $('close-form').hidden = true;
  } catch (err) {
    banner(`Could not close session ${id}: ${explain(err)}`);
  }
}

function orderRow(o) {
  return el('tr', { 'data-order': o.id },
    el('td', { text: o.id.slice(0, 12), title: o.id }),
    el('td', { text: o.cabinet_id }), el('td', { text: o.user_id }),
    el('td', { class: o.status === 'abnormal' || o.status === 'pending_payment' ? 'warn' : '', text: o.status }),
    el('td', { text: fen(o.total_fen) }), el('td', { text: fen(o.paid_fen) }), el('td', { text: fen(o.refunded_fen) }),
    el('td', { text: when(o.updated_at) }));
}

function renderAbnormal() {
  const list = [...S.abnormal.values()].sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)));
  $('tab-abnormal-count').textContent = list.length ? String(list.length) : '';
  const box = $('abnormal');
  // Keep forms an operator is typing in: only add and remove cards.
  const have = new Map([...box.children].map((n) => [n.dataset.order, n]));
  for (const [id, node] of have) if (!S.abnormal.has(id)) node.remove();
  for (const o of list) if (!have.has(o.id)) box.append(abnormalCard(o));
  $('abnormal-empty').hidden = list.length > 0;
}

function itemLine(sku, qty) {
  return el('div', { class: 'item' },
    el('input', { name: 'sku', placeholder: 'sku', value: sku || '', required: true }),
    el('input', { name: 'qty', type: 'number', min: '1', value: String(qty || 1), required: true }),
    el('button', { type: 'button', text: '−', onclick: (e) => e.target.parentElement.remove() }));
}

function abnormalCard(o) {
  const items = el('div', { class: 'items' }, itemLine());
  const msg = el('span', { class: 'muted', role: 'status' });
  const form = el('form', {
    onsubmit: async (e) => {
      e.preventDefault();
      const lines = [...items.querySelectorAll('.item')].map((n) => ({
        sku: n.querySelector('[name=sku]').value.trim(),
        qty: parseInt(n.querySelector('[name=qty]').value, 10),
      })).filter((l) => l.sku && l.qty > 0);
      msg.textContent = 'resolving…';
      try {
        const r = await api('POST', `/api/v1/orders/${encodeURIComponent(o.id)}/resolve`, { items: lines });
        msg.textContent = `resolved: ${r.order ? r.order.status : 'ok'}`;
      } catch (err) {
        msg.textContent = explain(err);
      }
    },
  }, items,
  el('button', { type: 'button', text: '+ item', onclick: () => items.append(itemLine()) }), ' ',
  el('button', { type: 'submit', text: 'Resolve and charge' }), ' ', msg);
  return el('div', { class: 'abn', 'data-order': o.id },
    el('div', {}, el('b', { text: o.id }), ` · cabinet ${o.cabinet_id} · user ${o.user_id} · ${o.channel} · `,
      el('span', { class: 'warn', text: o.abnormal_reason || 'abnormal' }), ` · ${when(o.created_at)}`),
    form);
}

// ---- cabinet detail --------------------------------------------------------------------------

async function openDetail(id) {
  S.detail = id;
  $('detail').hidden = false;
  $('d-title').textContent = id;
  $('d-config-msg').textContent = '';
  S.dirty.detail = true;
  schedule();
  try {
    const [cfg, hist, orders] = await Promise.all([
      api('GET', `/api/v1/cabinets/${encodeURIComponent(id)}/config`),
      api('GET', `/api/v1/alerts?cabinet_id=${encodeURIComponent(id)}&limit=20`),
      api('GET', `/api/v1/orders?cabinet_id=${encodeURIComponent(id)}&limit=10`),
    ]);
    if (S.detail !== id) return;
    fillConfig(cfg.config);
    const seen = new Set((S.events.get(id) || []).map((e) => e.text));
    for (const a of (hist.items || []).slice().reverse()) {
      const text = `alert ${a.type} raised${a.cleared_at ? ', cleared ' + when(a.cleared_at) : ''}`;
      if (!seen.has(text)) {
        logEvent(id, text);
        S.events.get(id)[0].at = Date.parse(a.raised_at) || Date.now();
      }
    }
    $('d-orders').replaceChildren(...(orders.items || []).map((o) => el('tr', {},
      el('td', { text: o.id.slice(0, 12) }), el('td', { text: o.status }), el('td', { text: fen(o.total_fen) }), el('td', { text: when(o.created_at) }))));
    S.dirty.detail = true;
    schedule();
  } catch (e) {
    banner('Could not load the cabinet: ' + explain(e));
  }
}

function fillConfig(c) {
  S.config = c;
  const f = $('d-config');
  if (!c) { $('d-config-msg').textContent = 'no configuration yet (activate the cabinet)'; return; }
  f.temp_target_c.value = c.temp_target_c;
  f.temp_lo.value = c.temp_range_c[0];
  f.temp_hi.value = c.temp_range_c[1];
  f.light_on.value = c.light.on;
  f.light_off.value = c.light.off;
  f.heartbeat_s.value = c.heartbeat_s;
  f.foreign_object_lock.checked = !!c.foreign_object_lock;
  $('d-config-msg').textContent = `version ${c.version}`;
}

async function saveConfig(e) {
  e.preventDefault();
  const f = e.target;
  const id = S.detail;
  const want = {
    temp_target_c: parseFloat(f.temp_target_c.value),
    temp_range_c: [parseFloat(f.temp_lo.value), parseFloat(f.temp_hi.value)],
    light: { on: f.light_on.value, off: f.light_off.value },
    heartbeat_s: parseInt(f.heartbeat_s.value, 10),
    foreign_object_lock: f.foreign_object_lock.checked,
  };
  // Only what the operator changed: a field someone else edited meanwhile is not overwritten.
  const body = {};
  for (const [k, v] of Object.entries(want)) {
    if (!S.config || JSON.stringify(S.config[k]) !== JSON.stringify(v)) body[k] = v;
  }
  if (!Object.keys(body).length) { $('d-config-msg').textContent = 'nothing changed'; return; }
  $('d-config-msg').textContent = 'saving…';
  try {
    const r = await api('PATCH', `/api/v1/cabinets/${encodeURIComponent(id)}/config`, body);
    fillConfig(r.config);
    $('d-config-msg').textContent = `saved version ${r.config.version}` + (r.pushed ? ', pushed to the cabinet' : ', will be pushed when it reconnects');
  } catch (err) {
    $('d-config-msg').textContent = explain(err);
  }
}

function renderDetail() {
  const c = S.cabinets.get(S.detail);
  if (!c) { $('d-state').replaceChildren(el('span', { text: 'unknown cabinet' })); return; }
  const kv = [
    ['link', c.online ? 'online' : 'offline'], ['point', c.point], ['status', c.status], ['door', c.door], ['lock', c.lock],
    ['cameras', (c.cameras || []).map((x) => `#${x.id} ${x.ok ? 'ok' : 'FAULT'}`).join(', ')],
    ['temperature', c.temp_c === null || c.temp_c === undefined ? '–' : `${c.temp_c}°C`], ['light', c.light],
    ['faulted', c.faulted ? 'yes — no new sessions' : 'no'], ['locked down', c.locked_down ? 'yes' : 'no'],
    ['session', c.session ? `${c.session.id} ${c.session.mode} ${c.session.phase}` : 'none'],
    ['config version', c.config_version ? `${c.config_version.reported ?? '–'} reported / ${c.config_version.desired ?? '–'} desired` : '–'],
    ['firmware', c.fw], ['last seen', when(c.last_seen_at)], ['service until', when(c.service_expires_at)],
  ];
  $('d-state').replaceChildren(...kv.flatMap(([k, v]) => [el('span', { text: k }), el('span', { text: v ?? '–' })]));
  $('d-alerts').replaceChildren(...((c.alerts || []).length ? c.alerts.map((a) => el('div', { 'data-alert-id': a.id },
    el('span', { class: `badge ${a.severity}${a.acked ? ' acked' : ''}`, text: a.type }), ` ${when(a.raised_at)} `,
    alertActions(Object.assign({ cabinet_id: c.id }, a)))) : [el('span', { class: 'muted', text: 'none' })]));
  $('d-events').replaceChildren(...(S.events.get(c.id) || []).map((e) => el('li', { text: `${clock(e.at)} ${e.text}` })));
}

// ---- wiring ----------------------------------------------------------------------------------

function showTab(tab) {
  S.tab = tab;
  for (const b of document.querySelectorAll('.tab')) b.classList.toggle('active', b.dataset.tab === tab);
  for (const p of document.querySelectorAll('.tabpane')) p.hidden = p.id !== `tab-${tab}`;
  markAll();
  S.dirty.sessions = S.dirty.abnormal = S.dirty.settlements = true;
  schedule();
}

document.addEventListener('DOMContentLoaded', () => {
  $('signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    $('signin-error').textContent = '';
    signIn($('key').value.trim(), $('remember').checked);
  });
  $('signout').addEventListener('click', () => signOut(''));
  $('bill-date').value = today();
  $('bill-form').addEventListener('submit', showBill);
  $('bill-download').addEventListener('click', downloadBill);
  $('service-form').addEventListener('submit', buyService);
  for (const b of document.querySelectorAll('.tab')) b.addEventListener('click', () => showTab(b.dataset.tab));
  for (const b of document.querySelectorAll('.count')) {
    b.addEventListener('click', () => { $('filter').value = b.dataset.filter; S.filter = b.dataset.filter; showTab('fleet'); });
  }
  $('search').addEventListener('input', (e) => { S.search = e.target.value.trim().toLowerCase(); S.dirty.fleet = true; schedule(); });
  $('filter').addEventListener('change', (e) => { S.filter = e.target.value; S.dirty.fleet = true; schedule(); });
  $('sort').addEventListener('change', (e) => { S.sort = e.target.value; S.dirty.fleet = true; schedule(); });
  $('fleet').addEventListener('scroll', () => renderRows(), { passive: true });
  $('d-close').addEventListener('click', () => { S.detail = null; $('detail').hidden = true; });
  $('d-config').addEventListener('submit', saveConfig);
  $('close-form').addEventListener('submit', submitClose);
  $('close-cancel').addEventListener('click', () => { $('close-form').hidden = true; });
  const saved = localStorage.getItem(KEY_STORE) || sessionStorage.getItem(KEY_STORE);
  if (saved) signIn(saved, !!localStorage.getItem(KEY_STORE));
});
