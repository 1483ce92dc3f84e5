// The console: signed in by an HttpOnly session cookie (never by a token kept in the page).
'use strict';
let signedIn = false;
function showLogin(msg) {
  signedIn = false;
  document.getElementById('main').hidden = true;
  document.getElementById('login').hidden = false;
  document.getElementById('error').textContent = msg || '';
}
async function api(path) {
  const r = await fetch('/api/v1' + path, { credentials: 'same-origin' });
  if (r.status === 401) { showLogin('Not signed in, or the session ended.'); throw new Error('Not signed in, or the session ended.'); }
  if (!r.ok) throw new Error((await r.json()).error.message);
  return r.json();
}
function row(cells) { const tr = document.createElement('tr'); for (const c of cells) { const td = document.createElement('td'); td.textContent = c; tr.appendChild(td); } return tr; }
async function load() {
  try {
    const s = await api('/status');
    signedIn = true;
    document.getElementById('practice').textContent = '— ' + s.practice.name;
    const t = document.getElementById('status'); t.replaceChildren();
    t.appendChild(row(['Practice ID', s.practice.id]));
    t.appendChild(row(['Charts', String(s.charts)]));
    t.appendChild(row(['Data directory', s.dataDir]));
    t.appendChild(row(['Sync address', s.sync.listen]));
    t.appendChild(row(['Active consent grants', String(s.shares)]));
    const p = document.getElementById('peers'); p.replaceChildren();
    if (!s.peers.length) p.appendChild(row(['No peers paired yet', '', '']));
    for (const peer of s.peers) p.appendChild(row([peer.name || peer.id, peer.connected ? 'connected' : 'offline', peer.lastSync || 'never']));
    document.getElementById('login').hidden = true;
    document.getElementById('main').hidden = false;
    document.getElementById('error').textContent = '';
    return true;
  } catch (e) { if (signedIn) document.getElementById('error').textContent = e.message; return false; }
}
// Work lists are read on opening and on Refresh only: each read is audit-logged.
async function lists() {
  try {
    const r = await api('/referrals');
    const t = document.getElementById('referrals'); t.replaceChildren();
    for (const x of r.referrals) t.appendChild(row([x.referral, x.status, x.direction, x.patient, x.reason]));
    if (!r.referrals.length) t.appendChild(row(['No referrals.']));
    const c = await api('/conflicts');
    const u = document.getElementById('conflicts'); u.replaceChildren();
    for (const x of c.conflicts) u.appendChild(row([String(x.id), x.chart, x.kind, x.summary]));
    if (!c.conflicts.length) u.appendChild(row(['Nothing to review.']));
    const d = await api('/due?within=30');
    const v = document.getElementById('due'); v.replaceChildren();
    for (const p of d.patients.slice(0, 200)) for (const i of p.items) v.appendChild(row([p.patient, p.chart, (i.overdue ? 'OVERDUE ' : '') + i.due, i.title]));
    if (!d.patients.length) v.appendChild(row(['Nobody is due.']));
  } catch (e) { document.getElementById('error').textContent = e.message; }
}
async function start() { if (await load()) lists(); }
document.getElementById('refresh').onclick = lists;
document.getElementById('save').onclick = async () => {
  const field = document.getElementById('token');
  const token = field.value.trim();
  field.value = '';
  // Exchanged once for the session cookie; not kept.
  const r = await fetch('/api/v1/session', { method: 'POST', credentials: 'same-origin', headers: { Authorization: 'Bearer ' + token } });
  if (!r.ok) { showLogin('The token was not accepted.'); return; }
  start();
};
document.getElementById('find').onclick = async () => {
  const q = document.getElementById('q').value;
  const r = await api('/charts?q=' + encodeURIComponent(q));
  const t = document.getElementById('results'); t.replaceChildren();
  for (const c of r.charts) t.appendChild(row([c.id, c.family + ', ' + c.given, c.birth_date, c.mrn]));
  if (!r.charts.length) t.appendChild(row(['No chart matches.']));
};
start();
setInterval(() => { if (signedIn) load(); }, 5000);
