// The chartmesh console. Signed in by an HttpOnly session cookie (never a token kept in the
// page); every change carries the session's CSRF token. Pages are built with DOM calls
// (text, never HTML from data). Reading a chart or a work list is audit-logged, so those
// pages are read when opened or refreshed, not on a timer.
'use strict';

const S = { csrf: null, user: null, peers: [], practice: null, route: '', live: null };
const $ = (id) => document.getElementById(id);

// h('tag', {attr: v, onclick: fn}, child, ...): an element; strings become text nodes.
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of kids.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}
const svg = (tag, attrs) => { const e = document.createElementNS('http://www.w3.org/2000/svg', tag); for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v)); return e; };

class ApiError extends Error { constructor(status, body) { super((body && body.error && body.error.message) || ('HTTP ' + status)); this.status = status; this.body = body; } }

async function api(path, opts) {
  const o = opts || {};
  const init = { method: o.method || 'GET', credentials: 'same-origin', headers: {} };
  if (init.method !== 'GET') {
    init.headers['X-Chartmesh-Csrf'] = S.csrf || '';
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(o.body || {});
  }
  const r = await fetch('/api/v1' + path, init);
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (r.status === 401) { showLogin('Not signed in, or the session ended.'); throw new ApiError(401, body); }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

function fmtTime(ms) { if (ms === null || ms === undefined) return 'never'; const d = new Date(ms); return d.toISOString().replace('T', ' ').slice(0, 16) + ' UTC'; }
function ago(ms) { if (!ms) return 'never'; const s = Math.round((Date.now() - ms) / 1000); if (s < 60) return s + ' s ago'; if (s < 3600) return Math.round(s / 60) + ' min ago'; if (s < 86400) return Math.round(s / 3600) + ' h ago'; return Math.round(s / 86400) + ' days ago'; }
function bytes(n) { if (n < 1024) return n + ' B'; if (n < 1048576) return (n / 1024).toFixed(1) + ' KiB'; if (n < 1073741824) return (n / 1048576).toFixed(1) + ' MiB'; return (n / 1073741824).toFixed(2) + ' GiB'; }
function peerName(id) { const p = S.peers.find((x) => x.id === id); return p ? (p.name || id.slice(0, 7)) : (id ? id.slice(0, 7) : ''); }
function say(msg) { $('error').textContent = msg || ''; }
function note(msg) { $('live').textContent = msg || ''; }

function table(headers, rows, empty, id) {
  const t = h('table', { id }, h('thead', {}, h('tr', {}, headers.map((x) => h('th', { scope: 'col' }, x)))));
  const b = h('tbody');
  if (!rows.length) b.append(h('tr', {}, h('td', { colspan: headers.length, class: 'muted' }, empty || 'Nothing.')));
  for (const r of rows) b.append(h('tr', {}, r.map((c) => h('td', {}, c))));
  t.append(b);
  return t;
}
function field(label, input) { return h('label', {}, label, input); }
let uid = 0;
function input(name, attrs) { return h('input', Object.assign({ name, id: 'f-' + name + '-' + (++uid) }, attrs || {})); }
function select(name, options, attrs) { return h('select', Object.assign({ name, id: 'f-' + name + '-' + (++uid) }, attrs || {}), options.map((o) => Array.isArray(o) ? h('option', { value: o[0] }, o[1]) : h('option', { value: o }, o))); }
// A form whose submit runs `fn(values, form)`; errors are shown next to it.
function form(id, label, kids, fn, submitText) {
  const msg = h('span', { class: 'err', role: 'alert' });
  const f = h('form', { class: 'inline', id, 'aria-label': label }, kids, h('button', { type: 'submit', class: 'primary' }, submitText || 'Save'), msg);
  f.addEventListener('submit', async (e) => {
    e.preventDefault();
    msg.textContent = '';
    const values = Object.fromEntries(new FormData(f).entries());
    try { await fn(values, f, msg); } catch (err) { msg.textContent = err.message; }
  });
  return f;
}
function button(text, fn, attrs) {
  return h('button', Object.assign({ type: 'button', onclick: async (e) => { say(''); try { await fn(e); } catch (err) { say(err.message); } } }, attrs || {}), text);
}
function view(title, ...kids) {
  const v = $('view');
  v.replaceChildren(h('h2', { id: 'view-title' }, title), ...kids);
  v.setAttribute('aria-labelledby', 'view-title');
}

// ---- sign-in ----
function showLogin(msg) {
  S.csrf = null;
  $('nav').hidden = true; $('who').hidden = true; $('view').replaceChildren();
  $('login').hidden = false;
  say(msg || '');
  if (S.live) { S.live.close(); S.live = null; }
}
async function signedIn() {
  const r = await fetch('/api/v1/session', { credentials: 'same-origin' });
  if (!r.ok) return false;
  const s = await r.json();
  if (!s.csrf) return false;
  S.csrf = s.csrf; S.user = s.user;
  $('actor').textContent = s.user;
  $('login').hidden = true; $('nav').hidden = false; $('who').hidden = false;
  return true;
}
$('login-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const token = $('token').value.trim();
  $('token').value = '';
  // Exchanged once for the session cookie; not kept.
  const r = await fetch('/api/v1/session', { method: 'POST', credentials: 'same-origin', headers: { Authorization: 'Bearer ' + token, 'Content-Type': 'application/json' }, body: JSON.stringify({ user: $('login-user').value }) });
  if (!r.ok) { let m = 'The token was not accepted.'; try { m = (await r.json()).error.message; } catch (_) { /* keep */ } showLogin(m); return; }
  start();
});
$('sign-out').addEventListener('click', async () => { try { await api('/session/end', { method: 'POST' }); } catch (_) { /* signed out anyway */ } showLogin('Signed out.'); });
$('change-user').addEventListener('click', async () => {
  const name = window.prompt('Who is using the console now? (recorded in the audit log)', S.user || '');
  if (!name) return;
  try { const r = await api('/session/user', { method: 'POST', body: { user: name } }); S.user = r.user; $('actor').textContent = r.user; } catch (err) { say(err.message); }
});

// ---- live updates ----
// Whether someone is typing into a form on the page (a live refresh would lose it).
function editing() {
  const a = document.activeElement;
  if (a && a.closest && a.closest('#view form')) return true;
  return [...document.querySelectorAll('#view input, #view textarea')].some((i) => (i.type === 'checkbox' ? i.checked !== i.defaultChecked : i.value !== i.defaultValue));
}
function startLive() {
  if (S.live || !window.EventSource) return;
  const es = new EventSource('/api/v1/events');
  let first = true;
  es.addEventListener('change', (e) => {
    const d = JSON.parse(e.data);
    const n = d.pendingPeers.length;
    $('pending-badge').hidden = n === 0;
    $('pending-badge').textContent = n ? String(n) : '';
    if (first) { first = false; return; }
    note('Updated ' + new Date().toLocaleTimeString() + ': ' + d.peers.filter((p) => p.connected).length + ' of ' + d.peers.length + ' peers connected.');
    // Status pages follow live; chart and work pages are audited reads: offer a refresh.
    if ((S.route === 'practice' || S.route === 'peers') && !editing()) route();
    else if (S.route === 'practice' || S.route === 'peers') { const t = $('view-title'); if (t && !$('stale')) t.append(h('span', { id: 'stale', class: 'muted' }, ' (changed since shown: reload the page to update)')); }
    else if (S.route === 'work' || S.route === 'chart') { const b = $('refresh'); if (b) b.classList.add('primary'); }
  });
  es.onerror = () => { note('Live updates paused (the daemon is not answering); retrying…'); };
  S.live = es;
}

// ---- pages ----
async function loadPeers() { S.peers = (await api('/peers')).peers; return S.peers; }

async function pagePractice() {
  const p = await api('/practice');
  S.practice = p;
  $('practice-name').textContent = '— ' + p.name;
  const lb = p.lastBackup ? fmtTime(p.lastBackup.timeMs) + ' (' + ago(p.lastBackup.timeMs) + ', by ' + p.lastBackup.by + ')' : 'never — see docs/OPERATIONS.md, "Backups"';
  const r = p.reachability || {};
  const relay = r.relay
    ? h('span', { class: r.relay.joined ? 'ok' : 'warn' }, r.relay.addr + (r.relay.joined ? ': joined' : ': not joined' + (r.relay.lastError ? ' (' + r.relay.lastError + ')' : '')))
    : 'none configured (practices behind NAT cannot reach this one without it: docs/OPERATIONS.md)';
  const lan = r.lanDiscovery || {};
  const pm = r.portMapping || {};
  const mapped = pm.external
    ? h('span', { class: 'ok' }, pm.external + ' (' + pm.protocol + ', lease ' + Math.floor((pm.leaseLeftS || 0) / 60) + ' min left)')
    : 'none' + (pm.reason ? ': ' + pm.reason : '');
  view('This practice',
    h('div', { class: 'cols' },
      h('div', {}, table(['', ''], [
        ['Practice name', p.name],
        ['Practice ID', h('span', { class: 'id', id: 'practice-id' }, p.id)],
        ['Sync address (give it to the other practice)', h('code', {}, p.addresses.sync)],
        ['Console and API', h('code', {}, p.addresses.api)],
        ['Reachable by other practices', h('span', { id: 'reach-listen', class: r.loopbackOnly ? 'warn' : 'ok' }, r.loopbackOnly ? 'no: sync listens on loopback only (set sync.listen, docs/OPERATIONS.md)' : 'yes, at ' + r.listen)],
        ['Relay', h('span', { id: 'reach-relay' }, relay)],
        ['Port mapped by the router', h('span', { id: 'reach-portmap' }, mapped)],
        ['LAN discovery', h('span', { id: 'reach-lan' }, lan.running ? 'on' : (lan.configured ? 'off (sync listens on loopback only)' : 'off (sync.lan_discovery = false)'))],
        ['Charts', String(p.charts)],
        ['Store size', bytes(p.storeBytes)],
        ['Last backup', lb],
        ['Data directory', h('code', {}, p.dataDir)],
        ['Practices waiting to pair', p.pendingPeers ? h('a', { href: '#/peers' }, String(p.pendingPeers) + ' — review') : '0'],
        ['Version', p.version],
      ])),
      h('div', {}, h('h3', {}, 'Practice ID as a QR code'),
        h('img', { class: 'qr', src: '/api/v1/practice/qr.svg', alt: 'QR code of this practice ID: ' + p.id }),
        h('p', { class: 'muted' }, 'The other practice pastes or scans this ID to pair.'))));
}

function peerState(p) {
  if (p.paused) return 'paused';
  if (p.lastError && !p.inSync) return 'error: ' + p.lastError;
  if (p.connected && p.inSync) return 'connected, in sync';
  if (p.connected) return 'connected, syncing';
  return 'offline';
}

async function pagePeers() {
  const [st, pend] = await Promise.all([api('/status'), api('/peers/pending')]);
  await loadPeers();
  const prompts = pend.pending.map((p) => {
    const name = input('name', { placeholder: 'e.g. Riverside Cardiology', size: 28 });
    const addr = input('addr', { value: p.addr || '', placeholder: 'HOST:PORT', size: 22, required: true });
    return h('div', { class: 'prompt', role: 'region', 'aria-label': 'Practice wants to connect' },
      h('p', {}, h('strong', {}, 'A practice wants to connect: '), h('span', { class: 'id pending-id' }, p.id),
        ' — ' + p.attempts + ' attempt(s), last ' + ago(p.lastMs) + (p.addr ? ', from ' + p.addr : '') + '. Pair only if you know this practice: compare its ID with the one they read to you.'),
      form('accept-' + p.id.slice(0, 8), 'Accept practice ' + p.id, [field('Name for this practice', name), field('Its sync address', addr)], async (v) => {
        await api('/peers/pending/' + encodeURIComponent(p.id) + '/accept', { method: 'POST', body: { name: v.name, addr: v.addr } });
        note('Paired with ' + (v.name || p.id) + '.');
        route();
      }, 'Accept and pair'),
      button('Dismiss', async () => { await api('/peers/pending/' + encodeURIComponent(p.id) + '/dismiss', { method: 'POST' }); route(); }));
  });
  const rows = st.peers.map((p) => [
    h('span', {}, h('strong', {}, p.name || '(no name)'), h('br'), h('span', { class: 'id' }, p.id)),
    h('span', { class: p.connected && p.inSync ? 'ok' : (p.lastError ? 'warn' : '') }, peerState(p)),
    p.addr,
    p.lastSyncMs ? fmtTime(p.lastSyncMs) + ' (' + ago(p.lastSyncMs) + ')' : 'never',
    p.connected ? (p.path || '') + (p.rttMs !== undefined ? ', ' + p.rttMs + ' ms' : '') : (p.unreachable || 'not connected'),
    clockSkew(p.clockSkewMs),
    String(p.pendingChanges) + ' change(s)',
    p.sharedTo + ' out / ' + p.sharedFrom + ' in',
    h('span', {},
      p.paused ? button('Resume', async () => { await api('/sync/resume', { method: 'POST', body: { peer: p.id } }); route(); })
        : button('Pause', async () => { await api('/sync/pause', { method: 'POST', body: { peer: p.id } }); route(); }),
      ' ',
      button('Unpair', async () => {
        if (!window.confirm('Unpair ' + (p.name || p.id) + '? Its consent grants are revoked.')) return;
        await api('/peers/' + encodeURIComponent(p.id), { method: 'DELETE' }); route();
      })),
  ]);
  view('Peers', ...prompts,
    table(['Practice', 'State', 'Address', 'Last sync', 'Path, round trip', 'Clock', 'Pending', 'Charts shared', 'Actions'], rows, 'No practice paired yet.', 'peers'),
    h('h3', {}, 'Pair with a practice'),
    h('p', { class: 'muted' }, 'Paste the other practice\'s ID (on its "This practice" page) and its sync address. Once both sides have paired, charts shared with consent sync.'),
    form('pair-form', 'Pair with a practice', [
      field('Practice ID', input('id', { size: 56, required: true, autocomplete: 'off', spellcheck: 'false' })),
      qrScanner(),
      field('Sync address', input('addr', { placeholder: 'HOST:PORT', size: 22, required: true })),
      field('Name', input('name', { size: 24 })),
    ], async (v, f) => {
      await api('/peers', { method: 'POST', body: { id: v.id.trim(), addr: v.addr.trim(), name: v.name || null } });
      f.reset(); note('Paired. It connects once the other practice has paired too (it sees a prompt).');
      route();
    }, 'Pair'));
}

// The peer's clock against ours: fine within a minute, else a warning (doctor says what to do).
function clockSkew(ms) {
  if (ms === undefined || ms === null) return h('span', { class: 'muted' }, 'not measured');
  const s = Math.round(ms / 1000);
  const txt = s === 0 ? 'in step' : Math.abs(s) + ' s ' + (s > 0 ? 'ahead' : 'behind');
  return Math.abs(ms) > 60000 ? h('span', { class: 'warn', title: 'Set up NTP on the practice whose clock is off (timedatectl set-ntp true)' }, txt + ' — fix the clock') : txt;
}

// Reads a practice ID from a photo or picture of its QR code (decoded here, in the page, by
// the vendored jsQR) into the pairing form's ID field.
function qrScanner() {
  const out = h('span', { class: 'muted', id: 'qr-result', role: 'status' });
  const file = h('input', { type: 'file', accept: 'image/*', capture: 'environment', id: 'qr-file', 'aria-describedby': 'qr-result' });
  file.addEventListener('change', async () => {
    const f = file.files && file.files[0];
    if (!f) return;
    out.textContent = 'Reading…';
    try {
      const id = await decodeQr(f);
      if (!id) { out.textContent = 'No QR code found in that picture: take it straight on, closer, in good light.'; return; }
      const box = file.closest('form').querySelector('input[name=id]');
      box.value = id.trim();
      out.textContent = 'Read the ID from the QR code: compare it with the one the other practice reads to you.';
    } catch (err) { out.textContent = 'The picture could not be read: ' + err.message; }
    file.value = '';
  });
  return field('or scan its QR code (a photo or picture of it)', h('span', {}, file, ' ', out));
}

async function decodeQr(f) {
  if (typeof window.jsQR !== 'function') throw new Error('the QR decoder did not load');
  const img = await createImageBitmap(f);
  // Large photos are scaled down: jsQR is quick on about a megapixel.
  const k = Math.min(1, 1200 / Math.max(img.width, img.height));
  const w = Math.max(1, Math.round(img.width * k)), hgt = Math.max(1, Math.round(img.height * k));
  const c = document.createElement('canvas');
  c.width = w; c.height = hgt;
  const g = c.getContext('2d', { willReadFrequently: true });
  g.fillStyle = '#fff'; g.fillRect(0, 0, w, hgt);
  g.drawImage(img, 0, 0, w, hgt);
  const r = window.jsQR(g.getImageData(0, 0, w, hgt).data, w, hgt, { inversionAttempts: 'attemptBoth' });
  return r ? r.data : null;
}

function peerOptions() { return S.peers.map((p) => [p.id, (p.name || '') + ' (' + p.id.slice(0, 7) + ')']); }

async function pageConsent() {
  const [sh] = await Promise.all([api('/shares'), loadPeers()]);
  const rows = sh.shares.map((g) => [
    g.chartId === '*' ? 'all charts' : h('a', { href: '#/chart/' + encodeURIComponent(g.chartId) }, g.chartId),
    peerName(g.peer), g.access, g.purpose,
    g.expiresMs ? fmtTime(g.expiresMs) : 'no expiry',
    g.recordedBy + ', ' + fmtTime(g.recordedMs),
    g.active ? h('span', { class: 'ok' }, 'active') : (g.revokedMs ? 'revoked ' + fmtTime(g.revokedMs) : 'expired'),
    g.active ? button('Revoke', async () => {
      await api('/revoke', { method: 'POST', body: g.chartId === '*' ? { all: true, peer: g.peer } : { charts: [g.chartId], peer: g.peer } });
      route();
    }, { 'aria-label': 'Revoke ' + g.chartId + ' for ' + peerName(g.peer) }) : '',
  ]);
  view('Consent',
    h('h3', {}, 'Share with a peer'),
    S.peers.length ? shareForm(null) : h('p', { class: 'muted' }, 'Pair with a practice first (Peers).'),
    h('h3', {}, 'Grants'),
    table(['Chart', 'Practice', 'Access', 'Purpose', 'Expires', 'Recorded by', 'State', ''], rows, 'Nothing is shared.', 'grants'));
}

function shareForm(chart) {
  const kids = [field('With practice', select('peer', peerOptions(), { required: true }))];
  if (!chart) kids.push(field('Charts (ids, comma-separated)', input('charts', { size: 30, placeholder: 'chart-000001, …' })), field('or all charts', h('input', { type: 'checkbox', name: 'all', value: 'yes', id: 'f-all-' + (++uid) })));
  kids.push(field('Access', select('access', [['read', 'read'], ['read-write', 'read-write']])),
    field('Purpose', select('purpose', ['continuity', 'referral', 'emergency', 'replica'])),
    field('Expires (optional)', input('expires', { type: 'date' })));
  return form(chart ? 'share-chart' : 'share-form', 'Share charts', kids, async (v, f) => {
    const body = { peer: v.peer, access: v.access, purpose: v.purpose };
    if (v.expires) body.expires = v.expires + 'T23:59:59Z';
    if (chart) body.charts = [chart];
    else if (v.all) body.all = true;
    else body.charts = (v.charts || '').split(',').map((x) => x.trim()).filter(Boolean);
    const r = await api('/shares', { method: 'POST', body });
    note('Shared: ' + r.granted.length + ' grant(s) recorded.');
    f.reset();
    route();
  }, 'Share');
}

async function pageCharts(q) {
  const box = input('q', { size: 40, value: q || '', placeholder: 'MRN, id, name or birth date (YYYY-MM-DD)', 'aria-label': 'Search charts' });
  let results = h('p', { class: 'muted' }, 'Each chart listed is recorded in the audit log as read.');
  if (q) {
    const r = await api('/charts?q=' + encodeURIComponent(q));
    results = table(['Chart', 'Patient', 'Born', 'MRN', 'Held'], r.charts.map((c) => [
      h('a', { href: '#/chart/' + encodeURIComponent(c.id) }, c.id), c.family + ', ' + c.given, c.birth_date, c.mrn, c.origin ? 'copy from ' + peerName(c.origin) : 'own']), 'No chart matches.');
  }
  view('Charts', form('search-form', 'Search charts', [field('Find a chart', box)], async (v) => { location.hash = '#/charts/' + encodeURIComponent(v.q); }, 'Search'), results);
  box.focus();
}

function numeric(o) { const v = Number(o.value); return o.value !== undefined && o.value !== null && Number.isFinite(v) ? v : null; }

// A line plot of one observation code's numeric values over time.
function trend(obs) {
  const pts = obs.map((o) => ({ t: Date.parse(o.date), v: numeric(o) })).filter((p) => Number.isFinite(p.t) && p.v !== null).sort((a, b) => a.t - b.t);
  if (pts.length < 2) return null;
  const W = 320, H = 110, P = 28;
  const t0 = pts[0].t, t1 = pts[pts.length - 1].t || t0 + 1;
  let lo = Math.min(...pts.map((p) => p.v)), hi = Math.max(...pts.map((p) => p.v));
  if (hi === lo) { hi += 1; lo -= 1; }
  const x = (t) => P + (W - 2 * P) * ((t - t0) / ((t1 - t0) || 1));
  const y = (v) => H - P / 1.5 - (H - 1.5 * P) * ((v - lo) / (hi - lo));
  const s = svg('svg', { class: 'trend', width: W, height: H, viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': 'Trend: ' + pts.map((p) => p.v).join(', ') });
  s.append(svg('polyline', { points: pts.map((p) => x(p.t).toFixed(1) + ',' + y(p.v).toFixed(1)).join(' ') }));
  for (const p of pts) s.append(svg('circle', { cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 3 }));
  const lab = (tx, X, Y, anchor) => { const e = svg('text', { x: X, y: Y, 'text-anchor': anchor || 'start' }); e.textContent = tx; s.append(e); };
  lab(String(hi), 2, 12); lab(String(lo), 2, H - 4);
  lab(new Date(t0).toISOString().slice(0, 10), P, H - 4); lab(new Date(t1).toISOString().slice(0, 10), W - 2, H - 4, 'end');
  return s;
}

function obsValue(o) {
  if (o.value !== undefined && o.value !== null) return (o.comparator || '') + o.value + (o.unit ? ' ' + o.unit : '');
  if (o.valueString) return o.valueString;
  if (o.valueCoding) return o.valueCoding.display || o.valueCoding.code || '';
  if (o.valueBoolean !== undefined) return String(o.valueBoolean);
  if (o.components && o.components.length) return o.components.map((c) => (c.display || c.code) + ' ' + (c.value ?? c.valueString ?? '') + (c.unit ? ' ' + c.unit : '')).join('; ');
  return '';
}

async function pageChart(id) {
  const enc = encodeURIComponent(id);
  const [c, cust, disc, refs, hist] = await Promise.all([api('/charts/' + enc), api('/charts/' + enc + '/custody'), api('/charts/' + enc + '/disclosures'), api('/referrals?direction=all'), api('/charts/' + enc + '/history')]);
  await loadPeers();
  const p = c.patient || {};
  const nm = p.name || {};
  const own = cust.status === 'own';
  const editable = own || cust.access === 'read-write';
  const held = own ? 'own chart' : cust.status + ' copy from ' + peerName(cust.custodian) + ' (' + (cust.access || '') + (cust.expiresMs ? ', until ' + fmtTime(cust.expiresMs) : '') + ')';
  const sec = (title, rows, headers, empty) => [h('h3', {}, title), table(headers, rows, empty)];
  // Observations by code, newest first, with a trend plot where there are numbers.
  const byCode = {};
  for (const o of c.observations || []) (byCode[o.code] = byCode[o.code] || []).push(o);
  const obsRows = Object.values(byCode).map((list) => {
    list.sort((a, b) => String(b.date).localeCompare(String(a.date)));
    const last = list[0];
    return [h('span', {}, last.display || last.code, h('br'), h('span', { class: 'muted' }, last.code)), obsValue(last), String(last.date).slice(0, 10), String(list.length), trend(list) || ''];
  });
  const chartRefs = refs.referrals.filter((r) => r.chart === id || r.chart === c.id);
  const medAlerts = h('div', { id: 'med-alerts' });
  const kids = [
    h('p', {}, h('strong', {}, (nm.family || '') + ', ' + (nm.given || []).join(' ')), ' — born ' + (p.birthDate || '?') + (p.sex ? ', ' + p.sex : '') + ', MRN ' + (p.mrn || '?') + (p.deceased ? ', deceased' : '') + ' — ', h('span', { class: own ? 'ok' : 'warn' }, held),
      ' ', h('button', { type: 'button', id: 'refresh', onclick: () => route() }, 'Refresh')),
    h('div', { class: 'cols' },
      h('div', {}, ...sec('Problems', (c.conditions || []).map((x) => [x.display || x.code, x.status || '', x.onset || '']), ['Problem', 'Status', 'Onset'], 'No problems recorded.')),
      h('div', {}, ...sec('Allergies', (c.allergies || []).map((x) => [x.substance, x.reaction || '', x.severity || x.criticality || '', x.status || '']), ['Substance', 'Reaction', 'Severity', 'Status'], 'No allergies recorded.')),
      h('div', {}, ...sec('Medications', (c.medications || []).map((x) => [x.name, [x.dose, x.route, x.frequency].filter(Boolean).join(' '), x.status || '', x.start || '']), ['Medication', 'Dose', 'Status', 'Since'], 'No medications recorded.')),
      h('div', {}, ...sec('Immunizations', (c.immunizations || []).map((x) => [x.vaccine, x.date, x.status || '']), ['Vaccine', 'Date', 'Status'], 'No immunizations recorded.'))),
    ...sec('Observations', obsRows, ['Observation', 'Latest', 'Date', 'Count', 'Trend'], 'No observations recorded.'),
    ...sec('Notes', (c.notes || []).slice().sort((a, b) => String(b.date).localeCompare(String(a.date))).map((x) => [String(x.date).slice(0, 16), x.author, h('span', { class: 'note-text' }, x.text)]), ['Date', 'Author', 'Note'], 'No notes.'),
    h('h3', {}, 'Referrals'), table(['Referral', 'Direction', 'Status', 'Practice', 'Reason', 'Consult notes'], chartRefs.map((r) => [r.referral, r.direction, r.status, peerName(r.direction === 'outgoing' ? r.to : r.from), r.reason, (r.consultNotes || []).map((n) => n.author + ': ' + n.text).join(' / ')]), 'No referrals.', 'chart-referrals'),
  ];
  if (editable) {
    const post = async (section, entry, extra) => api('/charts/' + enc + '/' + section, { method: 'POST', body: Object.assign({ entry }, extra || {}) });
    kids.push(h('h3', {}, 'Add to this chart'),
      form('note-form', 'Add a note', [field('Note', h('textarea', { name: 'text', rows: 3, cols: 60, required: true, id: 'f-note-' + (++uid) }))], async (v) => { await post('notes', { text: v.text }); route(); }, 'Add note'),
      form('med-form', 'Add a medication', [
        field('Medication', input('name', { required: true, size: 22 })), field('Dose', input('dose', { size: 10 })),
        field('Route', input('route', { size: 8 })), field('Frequency', input('frequency', { size: 12 })),
        field('Override reason (if alerts)', input('override', { size: 28 })),
      ], async (v) => {
        const entry = { name: v.name };
        for (const k of ['dose', 'route', 'frequency']) if (v[k]) entry[k] = v[k];
        try {
          await post('medications', entry, v.override ? { override: v.override } : {});
        } catch (e) {
          if (e.body && e.body.error && e.body.error.kind === 'alerts') {
            medAlerts.replaceChildren(h('div', { class: 'alerts', role: 'alert' }, h('strong', {}, 'Alerts for ' + v.name + ': '),
              h('ul', {}, e.body.error.alerts.map((a) => h('li', {}, (a.severity ? a.severity + ': ' : '') + a.message))),
              'Not added. To add it anyway, give an override reason (it is recorded in the chart) and save again.'));
            return;
          }
          throw e;
        }
        route();
      }, 'Add medication'),
      medAlerts,
      form('allergy-form', 'Add an allergy', [field('Substance', input('substance', { required: true })), field('Reaction', input('reaction')), field('Severity', select('severity', ['', 'mild', 'moderate', 'severe']))],
        async (v) => { const entry = { substance: v.substance }; if (v.reaction) entry.reaction = v.reaction; if (v.severity) entry.severity = v.severity; await post('allergies', entry); route(); }, 'Add allergy'),
      form('obs-form', 'Add an observation', [field('Code (LOINC)', input('code', { required: true, size: 10 })), field('Name', input('display', { size: 20 })), field('Value', input('value', { required: true, size: 8, inputmode: 'decimal' })), field('Unit', input('unit', { size: 8 })), field('Date', input('date', { type: 'date' }))],
        async (v) => {
          const n = Number(v.value);
          const entry = { code: v.code };
          if (v.value.trim() !== '' && Number.isFinite(n)) entry.value = n; else entry.valueString = v.value;
          if (v.display) entry.display = v.display; if (v.unit) entry.unit = v.unit; if (v.date) entry.date = v.date;
          await post('observations', entry); route();
        }, 'Add observation'));
  }
  if (own) {
    kids.push(h('h3', {}, 'Refer to another practice'),
      S.peers.length ? form('refer-form', 'Refer this chart', [field('To practice', select('to', peerOptions(), { required: true })), field('Reason', input('reason', { required: true, size: 36 })), field('Specialty', input('specialty', { size: 16 }))],
        async (v) => { await api('/referrals', { method: 'POST', body: { chart: id, to: v.to, reason: v.reason, specialty: v.specialty || null } }); note('Referred; the chart is shared read-write for the referral.'); route(); }, 'Refer') : h('p', { class: 'muted' }, 'Pair with a practice first.'),
      h('h3', {}, 'Share this chart'), S.peers.length ? shareForm(id) : '');
  }
  // Who changed what, when and where (from the chart's own change history; what changed is
  // named by section, never quoted).
  const changes = (hist.changes || []).slice().sort((x, y) => y.time_ms - x.time_ms);
  kids.push(h('h3', {}, 'History'),
    table(['When', 'Practice', 'Who', 'What changed'], changes.slice(0, 200).map((x) => [fmtTime(x.time_ms), historyPractice(x), x.author || '', x.action || '(change)']), 'No changes recorded.', 'history'),
    changes.length > 200 ? h('p', { class: 'muted' }, 'The 200 newest of ' + changes.length + ' changes; all of them: chartmesh history ' + id) : '');
  kids.push(h('h3', {}, 'Disclosures and consent events of this chart'),
    table(['When', 'Who', 'What', 'Practice', 'Detail'], disc.disclosures.map((e) => [fmtTime(e.time_ms), e.actor, e.action, peerName(e.peer), e.detail || '']), 'Nothing has left this practice.', 'disclosures'));
  view('Chart ' + id, ...kids);
}

// The practice that made a change: this one, a paired one by name, else its short id.
function historyPractice(x) {
  if (!x.practice) return '';
  if (S.practice && x.practice === S.practice.id) return 'this practice';
  return peerName(x.practice);
}

async function pageWork() {
  const within = S.dueWithin || 30;
  const [r, c, d] = await Promise.all([api('/referrals?direction=all'), api('/conflicts'), api('/due?within=' + within)]);
  await loadPeers();
  const step = (ref, s, text) => api('/referrals/' + encodeURIComponent(ref.referral) + '/' + s, { method: 'POST', body: text ? { text } : {} });
  const refRows = r.referrals.map((x) => {
    const acts = h('span', { class: 'actions' });
    if (x.direction === 'incoming' && x.status === 'requested') acts.append(button('Accept', async () => { await step(x, 'accept'); route(); }, { 'aria-label': 'Accept referral ' + x.referral }), ' ', button('Decline', async () => { await step(x, 'decline'); route(); }, { 'aria-label': 'Decline referral ' + x.referral }));
    if (x.direction === 'incoming' && (x.status === 'requested' || x.status === 'accepted')) {
      acts.append(form('consult-' + x.referral, 'Consult note for ' + x.referral, [field('Consult note', input('text', { size: 30, required: true }))], async (v) => { await step(x, 'note', v.text); route(); }, 'Add consult note'));
    }
    if (x.direction === 'incoming' && x.status === 'accepted') acts.append(button('Complete', async () => { await step(x, 'complete'); route(); }, { 'aria-label': 'Complete referral ' + x.referral }));
    if (x.direction === 'outgoing' && (x.status === 'requested' || x.status === 'accepted')) acts.append(button('Cancel', async () => { if (window.confirm('Cancel this referral? The chart stops being shared for it.')) { await step(x, 'cancel'); route(); } }));
    return [x.referral, x.direction, h('span', { class: 'ref-status' }, x.status), h('a', { href: '#/chart/' + encodeURIComponent(x.chart) }, x.patient || x.chart), peerName(x.direction === 'outgoing' ? x.to : x.from), x.reason, (x.consultNotes || []).map((n) => n.author + ': ' + n.text).join(' / '), acts];
  });
  const confRows = c.conflicts.map((x) => [String(x.id), h('a', { href: '#/chart/' + encodeURIComponent(x.chart) }, x.chart), x.kind, x.summary, peerName(x.peer),
    form('resolve-' + x.id, 'Resolve conflict ' + x.id, [field('Resolution', input('resolution', { size: 28, required: true }))], async (v) => { await api('/conflicts/' + x.id + '/resolve', { method: 'POST', body: { resolution: v.resolution } }); route(); }, 'Resolve')]);
  const f = S.dueFilter || {};
  const dueRows = [];
  for (const p of d.patients) for (const i of p.items) {
    if (f.overdue && !i.overdue) continue;
    if (f.rule && i.rule !== f.rule) continue;
    if (dueRows.length < 300) dueRows.push([h('a', { href: '#/chart/' + encodeURIComponent(p.chart) }, p.patient), i.overdue ? h('span', { class: 'warn' }, 'overdue ' + i.due) : i.due, i.title, i.lastDone || '', i.why || '']);
  }
  const rules = (d.rules || []);
  view('Work lists',
    h('p', {}, h('button', { type: 'button', id: 'refresh', onclick: () => route() }, 'Refresh'), h('span', { class: 'muted' }, ' Each list read is recorded in the audit log.')),
    h('h3', {}, 'Referrals'),
    table(['Referral', 'Direction', 'Status', 'Patient', 'Practice', 'Reason', 'Consult notes', 'Actions'], refRows, 'No referrals.', 'referrals'),
    h('h3', {}, 'Conflict inbox'),
    table(['#', 'Chart', 'Kind', 'What to review', 'Practice', 'Resolve'], confRows, 'Nothing to review.', 'conflicts'),
    h('h3', {}, 'Due list'),
    form('due-filter', 'Filter the due list', [
      field('Due within (days)', input('within', { type: 'number', min: 0, max: 3660, value: within, size: 5 })),
      field('What', select('rule', [['', 'everything']].concat(rules.map((x) => [x.rule, x.title])))),
      field('Overdue only', h('input', { type: 'checkbox', name: 'overdue', value: 'yes', id: 'f-overdue-' + (++uid), checked: f.overdue ? true : null })),
    ], async (v) => { S.dueWithin = Number(v.within) || 0; S.dueFilter = { rule: v.rule, overdue: !!v.overdue }; route(); }, 'Show'),
    table(['Patient', 'Due', 'What', 'Last done', 'Why'], dueRows, 'Nobody is due.', 'due'),
    h('h3', {}, 'Population report'), bars(rules));
  const sel = document.querySelector('#due-filter select');
  if (sel && f.rule) sel.value = f.rule;
}

// Bars: how many patients each rule finds due (and overdue).
function bars(rules) {
  if (!rules.length) return h('p', { class: 'muted' }, 'No rules.');
  const W = 640, row = 22, lw = 260;
  const max = Math.max(1, ...rules.map((r) => r.due));
  const s = svg('svg', { class: 'bars', width: W, height: rules.length * row + 4, role: 'img', 'aria-label': rules.map((r) => r.title + ': ' + r.due + ' due, ' + r.overdue + ' overdue').join('; ') });
  rules.forEach((r, i) => {
    const t = svg('text', { x: 0, y: i * row + 15 }); t.textContent = r.title; s.append(t);
    s.append(svg('rect', { x: lw, y: i * row + 4, height: 14, width: Math.max(1, (W - lw - 80) * r.due / max) }));
    const n = svg('text', { x: lw + (W - lw - 80) * r.due / max + 6, y: i * row + 15 }); n.textContent = r.due + ' (' + r.overdue + ' overdue)'; s.append(n);
  });
  return s;
}

async function pageAudit(params) {
  const q = new URLSearchParams(params || '');
  const r = await api('/audit/search?' + q.toString());
  const kids = [
    form('audit-form', 'Search the audit log', [
      field('Chart', input('chart', { value: q.get('chart') || '', size: 16 })),
      field('Who', input('actor', { value: q.get('actor') || '', size: 14 })),
      field('Action', input('action', { value: q.get('action') || '', size: 12, list: 'audit-actions' })),
      field('From', input('from', { type: 'date', value: q.get('from') || '' })),
      field('To', input('to', { type: 'date', value: q.get('to') || '' })),
    ], async (v) => { const p = new URLSearchParams(); for (const [k, x] of Object.entries(v)) if (x) p.set(k, x); location.hash = '#/audit/' + p.toString(); }, 'Search'),
    h('datalist', { id: 'audit-actions' }, ['read', 'search', 'create', 'update', 'share', 'revoke', 'pair', 'unpair', 'refer', 'referral', 'sync-send', 'sync-receive', 'refuse', 'export', 'backup', 'conflict', 'conflict-resolved', 'alert-override'].map((a) => h('option', { value: a }))),
    h('p', {}, button('Verify the audit chain', async () => {
      const v = await api('/audit/verify');
      $('verify-result').textContent = v.ok ? 'The chain is intact: ' + v.entries + ' entries.' : 'BROKEN at entry ' + v.firstBadSeq + ': ' + v.reason;
      $('verify-result').className = v.ok ? 'ok' : 'err';
    }, { id: 'verify' }), ' ', h('span', { id: 'verify-result', role: 'status' }), ' ',
    h('a', { href: '/api/v1/audit?format=fhir' + (q.get('chart') ? '&chart=' + encodeURIComponent(q.get('chart')) : ''), download: 'audit-events.json' }, 'Export as FHIR AuditEvent')),
    table(['#', 'When', 'Who', 'Action', 'Chart', 'Practice', 'Detail'], r.entries.map((e) => [String(e.seq), fmtTime(e.time_ms), e.actor, e.action, chartCell(e), e.peer ? peerName(e.peer) : '', e.detail || '']), 'No entries match.'),
  ];
  view('Audit log (newest first)', ...kids);
}

// The chart an audit entry is about. An entry for a list is given with the chart searched
// for only (the server cuts the list down) or, in a search of everything, with the count.
function chartCell(e) {
  const link = (c) => h('a', { href: '#/chart/' + encodeURIComponent(c) }, c);
  if (e.chart_id) return link(e.chart_id);
  const charts = e.charts || [];
  if (charts.length === 1) return link(charts[0]);
  const named = e.charts_named || charts.length;
  return named ? named + ' charts' : '';
}

// ---- routing ----
async function route() {
  const hash = location.hash || '#/practice';
  const [, page, ...rest] = hash.split('/');
  const arg = decodeURIComponent(rest.join('/'));
  S.route = page;
  for (const a of document.querySelectorAll('nav a')) {
    if (a.getAttribute('href') === '#/' + (page === 'chart' ? 'charts' : page)) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  say('');
  try {
    if (page === 'peers') await pagePeers();
    else if (page === 'consent') await pageConsent();
    else if (page === 'charts') await pageCharts(arg);
    else if (page === 'chart') await pageChart(arg);
    else if (page === 'work') await pageWork();
    else if (page === 'audit') await pageAudit(rest.join('/'));
    else await pagePractice();
  } catch (e) { if (!(e instanceof ApiError && e.status === 401)) say(e.message); }
}
let lastHash = null;
window.addEventListener('hashchange', async () => {
  await route();
  if (location.hash !== lastHash) { lastHash = location.hash; const t = $('view-title'); if (t) { t.setAttribute('tabindex', '-1'); t.focus(); } }
});

async function start() {
  if (!(await signedIn())) { showLogin(''); return; }
  if (!S.practice) { try { const p = await api('/practice'); S.practice = p; $('practice-name').textContent = '— ' + p.name; } catch (_) { /* shown by route */ } }
  startLive();
  await route();
}
start();
