// ferry web console. Plain JavaScript modules, no build step and no dependencies (see
// docs/ui.md for why). Everything it shows comes from `ferry ui`'s /api, which passes the
// hosts' and file servers' own APIs through; it changes nothing the CLI could not.

const main = document.getElementById('main');
let session = null; // { csrf, admin, version }
let overview = null; // { hosts: [...], file_servers: [...] }
let view = null; // { update() }

// ---- small helpers ----------------------------------------------------------------------

/** An element: h('p', {class: 'x', onclick: f}, 'text', child, ...). Text is never HTML. */
function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else if (k === 'for') e.htmlFor = v;
    else if (k === 'value') e.value = v;
    else if (k === 'checked') e.checked = !!v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function say(text) {
  const live = document.getElementById('live');
  live.textContent = '';
  setTimeout(() => { live.textContent = text; }, 50);
}

const mib = (b) => `${(b / 1048576).toFixed(1)} MiB`;
const human = (b) => {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = b, i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${b} B` : `${v.toFixed(1)} ${u[i]}`;
};
const secs = (ms) => `${(ms / 1000).toFixed(2)} s`;
const slug = (s) => String(s).replace(/[^A-Za-z0-9_-]/g, '_');
const badge = (s) => h('span', { class: `state ${s}` }, s);

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

/** A call to ferry ui's /api (JSON both ways; changing calls carry the CSRF token). */
async function api(method, path, body) {
  const headers = { accept: 'application/json' };
  if (body !== undefined) headers['content-type'] = 'application/json';
  if (method !== 'GET' && session) headers['x-ferry-csrf'] = session.csrf;
  const r = await fetch(`/api${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
  });
  if (r.status === 401) {
    location.href = '/login';
    throw new ApiError(401, { error: 'logged out' });
  }
  const text = await r.text();
  const json = text ? JSON.parse(text) : null;
  if (!r.ok) throw new ApiError(r.status, json);
  return json;
}

// Redraw `into` only when what it shows changed: the overview arrives every few seconds, and
// a link or a button rebuilt under the pointer loses the click being made on it.
const shown = new WeakMap();
function redraw(into, value, draw) {
  const key = JSON.stringify(value);
  if (shown.get(into) === key) return;
  shown.set(into, key);
  into.replaceChildren(draw());
}

function alertBox(msg) {
  return h('p', { role: 'alert' }, msg);
}

function field(id, label, input, hint) {
  input.id = id;
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    input,
    hint ? h('div', { class: 'hint', id: `${id}-hint` }, hint) : null);
}

function allVms() {
  if (!overview) return [];
  return overview.hosts.flatMap((x) => x.vms);
}

/** Where a VM is: the host that has it and is not only receiving it. */
function findVm(name) {
  const vms = allVms().filter((v) => v.name === name);
  return vms.find((v) => v.state !== 'incoming') || vms[0] || null;
}

// ---- moves: progress, as `ferry move` shows it -------------------------------------------

function memoryBytes(vmInfo) {
  return (vmInfo && vmInfo.config ? vmInfo.config.memory_mib : 1024) * 1048576;
}

/** Percent done of a move: its memory copy, or its disk copies. */
function percent(m, memBytes) {
  if (m.state === 'done') return 100;
  if (m.storage && m.storage.length && !m.progress) {
    const total = m.storage.reduce((a, s) => a + s.total_bytes, 0) || 1;
    const done = m.storage.reduce((a, s) => a + s.done_bytes, 0);
    return Math.min(99, Math.floor((done * 100) / total));
  }
  const p = m.progress;
  if (!p) return 0;
  if (m.state === 'postcopy') return Math.max(1, Math.min(99, 100 - Math.floor((p.postcopy_pages_left * 4096 * 100) / memBytes)));
  if (p.round === 0 && p.phase === 'memory') return Math.min(99, Math.floor((p.bytes_sent * 100) / memBytes));
  return Math.max(1, Math.min(99, 100 - Math.floor((p.dirty_pages * 4096 * 100) / memBytes)));
}

function moveLine(m) {
  if (m.state === 'queued') return `queued: ${m.waiting_for || 'waiting for a free slot'}`;
  const parts = [m.state];
  const p = m.progress;
  if (m.storage && m.storage.length && !m.progress && !['done', 'failed', 'cancelled'].includes(m.state)) {
    const total = m.storage.reduce((a, s) => a + s.total_bytes, 0);
    const done = m.storage.reduce((a, s) => a + s.done_bytes, 0);
    const copied = m.storage.reduce((a, s) => a + s.copied_bytes, 0);
    const skipped = m.storage.reduce((a, s) => a + s.skipped_bytes, 0);
    return `copying disks: ${mib(done)} of ${mib(total)} (${mib(copied)} copied, ${mib(skipped)} skipped as holes)`;
  }
  if (p && m.state === 'postcopy') {
    return p.postcopy_reconnecting
      ? `post-copy: the link to ${m.to} broke; reconnecting (the guest there waits for ${p.postcopy_pages_left} pages)`
      : `post-copy: runs on ${m.to}; ${p.postcopy_pages_left} pages still to go (${p.postcopy_pages_requested} fetched on demand)`;
  }
  if (p && ['migrating', 'switchover', 'settling'].includes(m.state)) {
    parts.push(`round ${p.round}`, `${mib(p.bytes_sent)} sent`, `${p.bandwidth_mbit.toFixed(0)} Mbit/s`,
      `expected pause ${p.expected_downtime_ms.toFixed(1)} ms`);
  }
  if (m.storage && m.storage.length) {
    const done = m.storage.reduce((a, s) => a + s.done_bytes, 0);
    const total = m.storage.reduce((a, s) => a + s.total_bytes, 0);
    parts.push(`storage ${mib(done)} of ${mib(total)}`);
  }
  return parts.join(' · ');
}

/** A move's report, for people. */
function reportView(r) {
  const rows = [
    ['Result', badge(r.result)],
    ['VM', r.vm],
    ['From', r.from],
    ['To', r.to],
    ['Runs on', r.runs_on],
    ['Total time', secs(r.total_ms)],
    ['Pause', r.downtime_ms == null ? '–' : `${r.downtime_ms.toFixed(1)} ms`],
  ];
  // A storage move leaves memory where it is; its disks have their own table below.
  if (r.from !== r.to) rows.push(['Memory sent', `${mib(r.bytes)} in ${r.rounds} rounds`]);
  if (r.queued_ms >= 100) rows.push(['Queued first', secs(r.queued_ms)]);
  if (r.from !== r.to) rows.push(['Stream', r.encrypted ? 'encrypted (mutual TLS between the hosts)' : 'not encrypted (a network both hosts trust)']);
  if (r.auth) rows.push(['Authorised by', r.auth]);
  const g = r.migration;
  if (g && r.result === 'done') {
    let how = g.mode === 'postcopy' ? `post-copy (${g.postcopy_pages_requested} pages fetched on demand)` : 'pre-copy';
    if (g.channels >= 2) how += `, memory on ${g.channels} connections`;
    rows.push(['Mode', g.mode_reason ? `${how}: ${g.mode_reason}` : how]);
  }
  if (r.error) rows.push(['Note', r.error]);
  const sec = h('section', { 'aria-label': 'Move report', class: 'report' },
    h('h3', {}, 'Report'),
    h('dl', { class: 'facts' }, rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])));
  if (r.disks && r.disks.length) {
    sec.append(h('table', {},
      h('thead', {}, h('tr', {}, ['Disk', 'From', 'To', 'Switched', 'Copied', 'Skipped', 'Mirrored', 'Old copy'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, r.disks.map((d) => h('tr', {},
        h('td', {}, d.disk), h('td', {}, d.from), h('td', {}, d.to), h('td', {}, d.switched ? 'yes' : 'no'),
        h('td', {}, mib(d.copied_bytes)), h('td', {}, mib(d.skipped_bytes)), h('td', {}, mib(d.mirrored_bytes)),
        h('td', {}, d.old_copy || '–'))))));
  }
  return sec;
}

/**
 * Follow one move live (the source daemon's /moves/ID/events, passed through): a progress bar,
 * a line of figures, a Cancel button, and the report at its end. Resolves with the report.
 */
function followMove(host, m, memBytes, into, { label = 'Move progress', onEnd } = {}) {
  const bar = h('progress', { max: '100', value: '0', 'aria-label': label });
  const line = h('p', { class: 'line', role: 'status' }, moveLine(m));
  const cancel = h('button', { type: 'button', class: 'danger' }, 'Cancel move');
  const out = h('div', {});
  const box = h('div', { class: 'move', 'data-move': m.id }, bar, line, h('div', { class: 'actions' }, cancel), out);
  into.append(box);
  return new Promise((resolve) => {
    let ended = false;
    const es = new EventSource(`/api/hosts/${encodeURIComponent(host)}/moves/${encodeURIComponent(m.id)}/events`);
    const show = (info) => {
      bar.value = percent(info, memBytes);
      bar.setAttribute('aria-valuetext', `${bar.value}%`);
      line.textContent = `${bar.value}% · ${moveLine(info)}`;
      if (['done', 'failed', 'cancelled'].includes(info.state) && !ended) {
        ended = true;
        es.close();
        cancel.remove();
        if (info.report) out.append(reportView(info.report));
        else out.append(alertBox(`the move ${info.state}: ${info.error || ''}`));
        say(`Move of ${info.vm} ${info.state}`);
        if (onEnd) onEnd(info);
        resolve(info);
      }
    };
    show(m);
    es.onmessage = (e) => show(JSON.parse(e.data));
    es.onerror = async () => {
      if (ended) return;
      // The daemon ended the stream: ask once where the move is; EventSource retries anyway.
      try {
        const info = await api('GET', `/hosts/${encodeURIComponent(host)}/moves/${encodeURIComponent(m.id)}`);
        show(info);
      } catch (_) { /* retried by EventSource */ }
    };
    cancel.addEventListener('click', async () => {
      cancel.disabled = true;
      cancel.textContent = 'Cancelling…';
      try {
        await api('POST', `/hosts/${encodeURIComponent(host)}/moves/${encodeURIComponent(m.id)}/cancel`, {});
        line.textContent = `cancelling: the VM stays on ${m.from}`;
      } catch (e) {
        out.append(alertBox(`cannot cancel: ${e.message}`));
        cancel.disabled = false;
        cancel.textContent = 'Cancel move';
      }
    });
  });
}

// ---- Hosts page ------------------------------------------------------------------------

function hostFacts(x) {
  if (!x.info) return h('p', { role: 'alert' }, `cannot reach ${x.name}: ${x.error || 'no answer'}`);
  const i = x.info;
  const s = i.settings;
  return h('dl', { class: 'facts' },
    h('dt', {}, 'Live migration'), h('dd', { 'data-fact': 'live-migration' }, s.live_migration ? 'on' : 'off'),
    h('dt', {}, 'CPU'), h('dd', {}, i.cpu_model),
    h('dt', {}, 'Memory free for VMs'), h('dd', {}, `${i.memory.free_for_vms_mib} MiB of ${i.memory.total_mib} MiB`),
    h('dt', {}, 'VMs'), h('dd', {}, `${i.vms_running} running, ${i.vms_defined} defined`),
    h('dt', {}, 'Moves'), h('dd', {}, `${i.moves.outgoing} out, ${i.moves.incoming} in, ${i.moves.queued} queued`),
    h('dt', {}, 'Limits'), h('dd', {}, `${s.max_migrations} live migrations, ${s.max_storage_moves} storage moves at once`),
    h('dt', {}, 'Migration networks'), h('dd', {}, s.migration_networks.length ? s.migration_networks.join(', ') : 'any'),
    h('dt', {}, 'Moves authorised'), h('dd', {}, s.migration_auth === 'delegated' ? 'by an admin\'s grant (delegated)' : 'from the host\'s own console'),
    h('dt', {}, 'Addresses'), h('dd', {}, i.addresses.join(', ')),
    h('dt', {}, 'ferry'), h('dd', {}, i.version));
}

function vmTable(vms) {
  if (!vms.length) return h('p', {}, 'No VMs.');
  return h('table', {},
    h('thead', {}, h('tr', {}, ['VM', 'State', 'Memory', 'vCPUs'].map((t) => h('th', { scope: 'col' }, t)))),
    h('tbody', {}, vms.map((v) => h('tr', {},
      h('td', {}, h('a', { href: `#/vm/${encodeURIComponent(v.name)}` }, v.name)),
      h('td', {}, badge(v.state)),
      h('td', {}, `${v.config.memory_mib} MiB`),
      h('td', {}, v.config.vcpus)))));
}

function settingsForm(x) {
  const n = slug(x.name);
  const lm = h('input', { type: 'checkbox', id: `lm-${n}` });
  const maxm = h('input', { type: 'number', min: '1', max: '64' });
  const maxs = h('input', { type: 'number', min: '1', max: '64' });
  const nets = h('input', { type: 'text', placeholder: '10.0.0.0/24, 10.0.1.0/24' });
  const auth = h('select', {}, h('option', { value: 'console' }, 'From the host\'s own console'), h('option', { value: 'delegated' }, 'With an admin\'s grant (delegated)'));
  const status = h('div', { role: 'status' });
  const form = h('form', { 'aria-label': `Migration settings of ${x.name}` },
    h('h3', {}, 'Migration settings'),
    h('div', { class: 'field' }, h('label', { class: 'check', for: `lm-${n}` }, lm, 'Allow this host to send and receive live migrations')),
    field(`maxm-${n}`, 'Live migrations at once', maxm),
    field(`maxs-${n}`, 'Storage moves at once', maxs),
    field(`nets-${n}`, 'Migration networks', nets, 'CIDRs, separated by commas; empty: any network'),
    field(`auth-${n}`, 'Moves are started', auth),
    h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save settings')),
    status);
  const fill = (i) => {
    if (!i || form.dataset.dirty) return;
    const s = i.settings;
    lm.checked = s.live_migration;
    maxm.value = s.max_migrations;
    maxs.value = s.max_storage_moves;
    nets.value = s.migration_networks.join(', ');
    auth.value = s.migration_auth;
  };
  form.addEventListener('input', () => { form.dataset.dirty = '1'; });
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    status.replaceChildren('Saving…');
    const patch = {
      live_migration: lm.checked,
      max_migrations: Number(maxm.value),
      max_storage_moves: Number(maxs.value),
      migration_networks: nets.value.split(',').map((s) => s.trim()).filter(Boolean),
      migration_auth: auth.value,
    };
    try {
      const r = await api('PATCH', `/hosts/${encodeURIComponent(x.name)}/host`, patch);
      const s = r.settings || r;
      delete form.dataset.dirty;
      status.replaceChildren(h('span', { class: 'ok' }, `Saved: live migration ${s.live_migration ? 'on' : 'off'}.`));
      say(`Settings of ${x.name} saved`);
    } catch (e) {
      status.replaceChildren(alertBox(e.message));
    }
  });
  form.fill = fill;
  fill(x.info);
  return form;
}

function evacuatePanel(x) {
  const panel = h('div', {});
  const open = h('button', { type: 'button', class: 'quiet' }, `Evacuate ${x.name}…`);
  panel.append(open);
  open.addEventListener('click', () => {
    open.hidden = true;
    const others = overview.hosts.filter((o) => o.name !== x.name && o.info);
    const boxes = others.map((o) => h('label', { class: 'choice' }, h('input', { type: 'checkbox', value: o.name, checked: true }), ` ${o.name}`));
    const go = h('button', { type: 'submit' }, 'Start evacuation');
    const rows = h('section', { 'aria-label': `Evacuation of ${x.name}` });
    const form = h('form', {},
      h('fieldset', {}, h('legend', {}, `Move every running VM off ${x.name} to`), boxes),
      h('div', { class: 'actions' }, go, h('button', { type: 'button', class: 'quiet', onclick: () => { form.remove(); open.hidden = false; } }, 'Close')),
      rows);
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      go.disabled = true;
      const to = boxes.map((b) => b.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
      try {
        const e = await api('POST', `/hosts/${encodeURIComponent(x.name)}/evacuate`, { to });
        if (!e.moves.length) rows.append(h('p', {}, 'No VM to move.'));
        for (const s of e.skipped) rows.append(h('p', {}, `${s.vm} stays: ${s.reason}`));
        for (const m of e.moves) {
          const row = h('div', { class: 'card' }, h('h4', {}, `${m.vm} → ${m.to}`));
          rows.append(row);
          followMove(x.name, m, memoryBytes(findVm(m.vm)), row, { label: `Move of ${m.vm}` });
        }
      } catch (err) {
        rows.append(alertBox(err.message));
        go.disabled = false;
      }
    });
    panel.append(form);
  });
  return panel;
}

function hostsView() {
  main.replaceChildren(h('h1', {}, 'Hosts'));
  const cards = new Map();
  const update = () => {
    if (!overview) return;
    for (const x of overview.hosts) {
      let c = cards.get(x.name);
      if (!c) {
        const facts = h('div', {});
        const vms = h('div', {});
        const form = settingsForm(x);
        const sec = h('section', { class: 'card', 'aria-labelledby': `host-${slug(x.name)}` },
          h('h2', { id: `host-${slug(x.name)}` }, x.name),
          h('div', { class: 'cols' }, h('div', {}, facts, h('h3', {}, 'VMs'), vms), h('div', {}, form, evacuatePanel(x))));
        main.append(sec);
        c = { facts, vms, form };
        cards.set(x.name, c);
      }
      redraw(c.facts, [x.info, x.error], () => hostFacts(x));
      redraw(c.vms, x.vms.map((v) => [v.name, v.state, v.config.memory_mib, v.config.vcpus]), () => vmTable(x.vms));
      c.form.fill(x.info);
    }
  };
  update();
  return { update };
}

// ---- VM page and the Move wizard ---------------------------------------------------------

function diskWhere(d) {
  const uri = d.path.startsWith('nbd://') || d.path.startsWith('nbds://') ? d.path : null;
  if (!uri) return { where: 'local file on its host', lease: '–' };
  const exp = decodeURIComponent(uri.split('/').slice(3).join('/'));
  for (const s of (overview ? overview.file_servers : [])) {
    for (const sh of ((s.shares && s.shares.shares) || [])) {
      const disk = sh.disks.find((x) => x.export === exp);
      if (disk) return { where: `share ${s.title}:${sh.name}`, lease: disk.lease.holder ? `${disk.lease.holder} (fence ${disk.lease.fence})` : 'nobody' };
    }
  }
  return { where: `network disk ${exp}`, lease: 'unknown' };
}

function netText(n) {
  const b = n.backend || {};
  const kind = Object.keys(b)[0];
  const v = kind ? b[kind] : '';
  return `${kind || 'net'} ${typeof v === 'object' ? JSON.stringify(v) : v}${n.mac ? ` · MAC ${n.mac}` : ''}`;
}

function consoleView() {
  const pre = h('pre', { class: 'console', tabindex: '0', 'aria-label': 'Serial console (COM1): type here to send keys to the guest' });
  pre.addEventListener('keydown', (e) => {
    if (!ws || ws.readyState !== WebSocket.OPEN || e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key === 'Enter' ? '\r' : e.key === 'Backspace' ? '\x7f' : e.key === 'Tab' ? '\t' : e.key.length === 1 ? e.key : null;
    if (key === null) return;
    e.preventDefault();
    ws.send(new TextEncoder().encode(key));
  });
  let ws = null;
  let host = null;
  const dec = new TextDecoder();
  const attach = (vmHost, vmName) => {
    if (host === vmHost && ws) return;
    if (ws) ws.close();
    host = vmHost;
    ws = new WebSocket(`wss://${location.host}/api/hosts/${encodeURIComponent(vmHost)}/vms/${encodeURIComponent(vmName)}/console`);
    ws.binaryType = 'arraybuffer';
    ws.onmessage = (e) => {
      const t = typeof e.data === 'string' ? e.data : dec.decode(e.data, { stream: true });
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.textContent = (pre.textContent + t).slice(-65536);
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    };
    ws.onclose = () => { if (host === vmHost) { ws = null; host = null; } };
  };
  return { el: pre, attach, close: () => { if (ws) ws.close(); host = null; } };
}

function vmView(name) {
  const title = h('h1', {}, `VM ${name}`);
  const facts = h('div', {});
  const disks = h('div', {});
  const nets = h('div', {});
  const con = consoleView();
  const moveBtn = h('button', { type: 'button' }, 'Move…');
  const wizardBox = h('div', {});
  main.replaceChildren(title, h('section', { class: 'card', 'aria-label': 'Details' }, facts, h('div', { class: 'actions' }, moveBtn)),
    wizardBox,
    h('section', { class: 'card', 'aria-labelledby': 'disks-h' }, h('h2', { id: 'disks-h' }, 'Disks'), disks),
    h('section', { class: 'card', 'aria-labelledby': 'nets-h' }, h('h2', { id: 'nets-h' }, 'Networks'), nets),
    h('section', { class: 'card', 'aria-labelledby': 'con-h' }, h('h2', { id: 'con-h' }, 'Console'), con.el));
  moveBtn.addEventListener('click', () => {
    const v = findVm(name);
    if (!v) return;
    moveBtn.disabled = true;
    wizardBox.replaceChildren(wizard(v, () => { moveBtn.disabled = false; }));
    wizardBox.querySelector('input,select,button')?.focus();
  });
  const update = () => {
    const v = findVm(name);
    if (!v) {
      facts.replaceChildren(h('p', {}, overview ? `No host has a VM named ${name}.` : 'Loading…'));
      return;
    }
    title.textContent = `VM ${name}`;
    facts.replaceChildren(h('dl', { class: 'facts' },
      h('dt', {}, 'Host'), h('dd', { 'data-fact': 'host' }, v.host),
      h('dt', {}, 'State'), h('dd', { 'data-fact': 'state' }, badge(v.state)),
      h('dt', {}, 'Memory'), h('dd', {}, `${v.config.memory_mib} MiB`),
      h('dt', {}, 'vCPUs'), h('dd', {}, v.config.vcpus),
      h('dt', {}, 'Up'), h('dd', {}, v.uptime_ms == null ? '–' : secs(v.uptime_ms)),
      h('dt', {}, 'Kernel'), h('dd', {}, v.config.kernel),
      v.move_id ? [h('dt', {}, 'Moving'), h('dd', {}, `move ${v.move_id}`)] : null));
    disks.replaceChildren(v.config.disks.length ? h('table', {},
      h('thead', {}, h('tr', {}, ['#', 'Disk', 'Where', 'Write lease'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, v.config.disks.map((d, i) => {
        const w = diskWhere(d);
        return h('tr', {}, h('td', {}, i), h('td', {}, d.path, d.read_only ? ' (read-only)' : ''), h('td', {}, w.where), h('td', {}, w.lease));
      }))) : h('p', {}, 'No disks.'));
    nets.replaceChildren(v.config.nets.length ? h('ul', {}, v.config.nets.map((n) => h('li', {}, netText(n)))) : h('p', {}, 'No networks.'));
    if (['running', 'paused', 'moving'].includes(v.state)) con.attach(v.host, v.name);
  };
  update();
  return { update, close: con.close };
}

/** The Move wizard: what, where, the check, a summary; then the move, live. */
function wizard(vm, onClose) {
  const st = { step: 1, what: 'vm', to: '', storage_to: '', disk_to: {}, keep_source: false, downtime_ms: 300, bandwidth_mbit: 0 };
  const names = ['What to move', 'Destination', 'Compatibility check', 'Summary'];
  const box = h('section', { class: 'card', 'aria-labelledby': 'wiz-h' });
  const body = h('div', {});
  const steps = h('ol', { class: 'steps' });
  box.append(h('h2', { id: 'wiz-h' }, `Move ${vm.name}`), steps, body);
  const close = () => { box.remove(); onClose(); };
  const others = () => overview.hosts.filter((o) => o.name !== vm.host && o.info).map((o) => o.name);
  const shares = () => (overview.file_servers || []).flatMap((s) => ((s.shares && s.shares.shares) || []).map((sh) => `${s.title}:${sh.name}`));
  const movesVm = () => st.what !== 'storage';
  const movesDisks = () => st.what !== 'vm';
  const diskDests = () => Object.entries(st.disk_to).filter(([, d]) => d.trim()).map(([disk, to]) => ({ disk, to: to.trim() }));
  const dests = () => [st.storage_to, ...diskDests().map((d) => d.to)].filter((d) => d && d.trim());
  // The VM to another host and its disks onto a share: the disks first, then the VM.
  const twoSteps = () => st.what === 'both' && dests().some((d) => !d.startsWith('/'));
  const request = (part) => ({
    vm: vm.name,
    host: part === 'vm' ? (findVm(vm.name) || vm).host : vm.host,
    to: part === 'disks' ? '' : st.to,
    storage_to: part === 'vm' ? null : (st.storage_to.trim() || null),
    disk_to: part === 'vm' ? [] : diskDests(),
    keep_source: part !== 'vm' && st.keep_source,
    settings: { downtime_ms: Number(st.downtime_ms), bandwidth_mbit: Number(st.bandwidth_mbit), timeout_s: 600 },
  });
  const firstPart = () => (twoSteps() ? 'disks' : 'all');
  const nav = (...buttons) => h('div', { class: 'actions' }, buttons, h('button', { type: 'button', class: 'quiet', onclick: close }, 'Close'));
  const btn = (label, f, cls) => h('button', { type: 'button', class: cls, onclick: f }, label);

  const render = () => {
    steps.replaceChildren(...names.map((n, i) => h('li', { 'aria-current': st.step === i + 1 ? 'step' : null }, `${i + 1}. ${n}`)));
    body.dataset.step = String(st.step);
    ({ 1: step1, 2: step2, 3: step3, 4: step4 })[st.step]();
    body.querySelector('input,select')?.focus();
  };

  function step1() {
    const opt = (value, label, desc) => h('div', { class: 'choice' },
      h('input', { type: 'radio', name: 'what', id: `what-${value}`, value, checked: st.what === value, 'aria-describedby': `what-${value}-d`, onchange: () => { st.what = value; } }),
      h('label', { for: `what-${value}` }, ` ${label}`), h('span', { id: `what-${value}-d` }, desc));
    body.replaceChildren(h('fieldset', {}, h('legend', {}, 'What to move'),
      opt('vm', 'The virtual machine', `Its memory, CPU and device state move to another host; its disks stay where they are (a share both hosts reach, or the same path on both).`),
      opt('storage', 'The virtual machine\'s storage', `Its disks move, while it runs, to another folder or onto a share; the VM stays on ${vm.host}.`),
      opt('both', 'Both', 'The VM and its disks: into the other host\'s folders (shared-nothing: the disks are copied while it runs, then it moves in one pause), or onto a share and then the VM.')),
    nav(btn('Next', () => { st.step = 2; render(); })));
  }

  function step2() {
    const parts = [];
    const err = h('div', {});
    if (movesVm()) {
      const sel = h('select', { onchange: (e) => { st.to = e.target.value; } },
        h('option', { value: '' }, '— choose a host —'), others().map((o) => h('option', { value: o, selected: st.to === o }, o)));
      parts.push(field('wiz-to', 'Destination host', sel));
    }
    if (movesDisks()) {
      const list = h('datalist', { id: 'wiz-dests' }, shares().map((s) => h('option', { value: s })));
      parts.push(list, field('wiz-storage', 'Destination for the disks',
        h('input', { type: 'text', list: 'wiz-dests', value: st.storage_to, placeholder: '/srv/vms or fs1:vms', oninput: (e) => { st.storage_to = e.target.value; } }),
        st.what === 'both' ? 'A folder of the destination host (an absolute path), or a share (SERVER:SHARE)' : `A folder on ${vm.host} (an absolute path), or a share (SERVER:SHARE)`));
      if (vm.config.disks.length > 1) {
        parts.push(h('fieldset', {}, h('legend', {}, 'Per disk (optional, overrides the above)'),
          vm.config.disks.map((d, i) => field(`wiz-disk-${i}`, `Disk ${i}: ${d.path}`,
            h('input', { type: 'text', list: 'wiz-dests', value: st.disk_to[i] || '', oninput: (e) => { st.disk_to[i] = e.target.value; } })))));
      }
      parts.push(h('label', { class: 'check' }, h('input', { type: 'checkbox', checked: st.keep_source, onchange: (e) => { st.keep_source = e.target.checked; } }), ' Keep the old copies'));
    }
    parts.push(field('wiz-downtime', 'Longest pause the guest may see (ms)',
      h('input', { type: 'number', min: '1', value: st.downtime_ms, oninput: (e) => { st.downtime_ms = e.target.value; } })));
    parts.push(field('wiz-bw', 'Bandwidth cap (Mbit/s, 0: none)',
      h('input', { type: 'number', min: '0', value: st.bandwidth_mbit, oninput: (e) => { st.bandwidth_mbit = e.target.value; } })));
    body.replaceChildren(...parts, err, nav(
      btn('Back', () => { st.step = 1; render(); }, 'quiet'),
      btn('Next', () => {
        if (movesVm() && !st.to) { err.replaceChildren(alertBox('Choose the destination host.')); return; }
        if (movesDisks() && !dests().length) { err.replaceChildren(alertBox('Give a folder or a share for the disks.')); return; }
        st.step = 3; render();
      })));
  }

  async function step3() {
    body.replaceChildren(h('p', { role: 'status' }, 'Checking…'));
    let r;
    try {
      r = await api('POST', '/moves', { ...request(firstPart()), check: true });
    } catch (e) {
      body.replaceChildren(alertBox(`The check could not run: ${e.message}`), nav(btn('Back', () => { st.step = 2; render(); }, 'quiet')));
      return;
    }
    const bad = r.checks.filter((c) => !c.ok);
    const list = h('ul', { class: 'checks', 'aria-label': 'Check results' }, r.checks.map((c) => h('li', { 'data-ok': String(c.ok) },
      h('strong', { class: c.ok ? 'ok' : 'bad' }, c.ok ? 'OK ' : 'Problem '), `${c.name}: ${c.detail}`,
      c.fix ? h('span', { class: 'fix' }, `Fix: ${c.fix}`) : null)));
    const head = r.ok
      ? h('p', { role: 'status', class: 'ok' }, `${r.vm} can move from ${r.from} to ${r.to}.`)
      : h('p', { role: 'alert' }, `${r.vm} cannot move from ${r.from} to ${r.to}: ${bad.length} problem${bad.length === 1 ? '' : 's'}. Nothing was started.`);
    const more = twoSteps() ? h('p', {}, `This is two moves: the disks onto the share first, then the VM to ${st.to}; the VM's move is checked once its disks are on the share.`) : null;
    body.replaceChildren(...[head, list, more].filter(Boolean), nav(
      btn('Back', () => { st.step = 2; render(); }, 'quiet'),
      btn('Check again', () => render(), 'quiet'),
      r.ok ? btn('Next', () => { st.step = 4; render(); }) : null));
  }

  function step4() {
    const rows = [['VM', vm.name], ['From', vm.host]];
    if (movesVm()) rows.push(['To host', st.to]);
    if (movesDisks()) {
      rows.push(['Disks to', st.storage_to || '–']);
      for (const d of diskDests()) rows.push([`Disk ${d.disk} to`, d.to]);
      rows.push(['Old copies', st.keep_source ? 'kept' : 'removed once the VM uses the new ones']);
    }
    rows.push(['Longest pause', `${st.downtime_ms} ms`], ['Bandwidth cap', Number(st.bandwidth_mbit) ? `${st.bandwidth_mbit} Mbit/s` : 'none']);
    const start = btn('Start move', () => run(start));
    body.replaceChildren(h('dl', { class: 'facts', 'aria-label': 'Summary' }, rows.flatMap(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
      nav(btn('Back', () => { st.step = 3; render(); }, 'quiet'), start));
  }

  async function one(part, into) {
    const req = request(part);
    let m;
    try {
      m = await api('POST', '/moves', req);
    } catch (e) {
      into.append(alertBox(`Nothing moved: ${e.message}`));
      if (e.body && e.body.check) for (const c of e.body.check.checks.filter((x) => !x.ok)) into.append(h('p', {}, `${c.name}: ${c.detail}${c.fix ? ` (fix: ${c.fix})` : ''}`));
      return null;
    }
    return followMove(req.host, m, memoryBytes(vm), into);
  }

  async function run(start) {
    start.disabled = true;
    steps.replaceChildren(h('li', { 'aria-current': 'step' }, 'Moving'));
    const live = h('div', { 'aria-label': 'Move under way' });
    body.replaceChildren(live);
    let info = await one(firstPart(), live);
    if (info && info.state === 'done' && twoSteps()) {
      live.append(h('h3', {}, `Then: ${vm.name} to ${st.to}`));
      info = await one('vm', live);
    }
    live.append(nav());
  }

  render();
  return box;
}

// ---- Shares page -----------------------------------------------------------------------

function sharesView() {
  main.replaceChildren(h('h1', {}, 'Shares'));
  const holder = h('div', {});
  main.append(holder);
  // One card per file server or share, kept across redraws and patched in place: the
  // overview changes every few seconds (a share's free space moves with any disk write),
  // and a form or a button rebuilt under the pointer would lose the click being made on it.
  const cards = new Map();
  const update = () => {
    if (!overview) return;
    const servers = overview.file_servers || [];
    const want = [];
    if (!servers.length) {
      want.push(['none', () => h('p', {}, 'No file server. Start one with ', h('code', {}, 'ferry share run'),
        ', enrol it in the cluster, or give ', h('code', {}, 'ferry ui --share-server ADDRESS'), '.')]);
    }
    for (const s of servers) {
      if (!s.shares) {
        want.push([`down:${s.name}:${s.error}`, () => h('section', { class: 'card' }, h('h2', {}, s.title), alertBox(`cannot reach ${s.name}: ${s.error}`))]);
      } else if (!s.shares.shares.length) {
        want.push([`empty:${s.name}`, () => h('section', { class: 'card' }, h('h2', {}, s.title), h('p', {}, 'No shares.'))]);
      } else {
        for (const sh of s.shares.shares) want.push([`share:${s.name}:${sh.name}`, () => shareCard(s, sh), sh]);
      }
    }
    const keep = new Set(want.map(([k]) => k));
    for (const [k, c] of cards) if (!keep.has(k)) { c.node.remove(); cards.delete(k); }
    let prev = null;
    for (const [k, make, sh] of want) {
      let c = cards.get(k);
      if (!c) {
        const made = make();
        c = made.node ? made : { node: made };
        cards.set(k, c);
      }
      if (sh && c.fill) c.fill(sh);
      // In the overview's order, moving only what is out of place.
      const at = prev ? prev.nextSibling : holder.firstChild;
      if (at !== c.node) holder.insertBefore(c.node, at);
      prev = c.node;
    }
  };
  update();
  return { update };
}

// A share's card: its facts, access list and disks follow the overview; its grant form is
// built once, so what is being chosen in it stays chosen.
function shareCard(s, sh) {
  const id = `share-${slug(s.name)}-${slug(sh.name)}`;
  const base = `/shares/${encodeURIComponent(s.name)}/shares/${encodeURIComponent(sh.name)}`;
  const status = h('div', { role: 'status' });
  const facts = h('div', {});
  const access = h('div', {});
  const disks = h('div', {});
  const hostSel = h('select', {});
  const accSel = h('select', {}, h('option', { value: 'read' }, 'read'), h('option', { value: 'write' }, 'read and write'));
  const grant = h('form', { 'aria-label': `Grant access to ${sh.name}` },
    field(`${id}-host`, 'Host', hostSel), field(`${id}-access`, 'Access', accSel),
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: `${id}-grant` }, 'Grant')), status);
  grant.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const host = hostSel.value;
    const a = accSel.value;
    try {
      await api('PUT', `${base}/access/${encodeURIComponent(host)}`, { access: a });
      status.replaceChildren(h('span', { class: 'ok' }, `${host} may ${a === 'write' ? 'read and write' : 'read'} ${sh.name}.`));
    } catch (e) { status.replaceChildren(alertBox(e.message)); }
  });
  const node = h('section', { class: 'card', 'aria-labelledby': id },
    h('h2', { id }, `${s.title}: ${sh.name}`), facts, h('h3', {}, 'Access list'), access, grant, h('h3', {}, 'Disks'), disks);
  const drawn = {};
  const fill = (sh) => {
    redraw(facts, [sh.path, sh.free_bytes], () => h('dl', { class: 'facts' },
      h('dt', {}, 'Folder'), h('dd', {}, sh.path), h('dt', {}, 'Free'), h('dd', {}, human(sh.free_bytes))));
    const list = Object.entries(sh.access);
    redraw(access, list, () => (list.length ? h('table', {},
      h('thead', {}, h('tr', {}, ['Host', 'Access', ''].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, list.map(([host, a]) => h('tr', {}, h('td', {}, host), h('td', {}, a === 'write' ? 'read and write' : 'read'),
        h('td', {}, h('button', {
          type: 'button', class: 'quiet', 'aria-label': `Revoke ${host}'s access to ${sh.name}`,
          onclick: async () => {
            try { await api('DELETE', `${base}/access/${encodeURIComponent(host)}`); status.replaceChildren(`${host} no longer has access.`); } catch (e) { status.replaceChildren(alertBox(e.message)); }
          },
        }, 'Revoke')))))) : h('p', {}, 'No host may open its disks.')));
    // The host list changes rarely; keep the host being chosen when it is still there.
    const names = overview.hosts.map((x) => x.name);
    if (drawn.hosts !== JSON.stringify(names)) {
      drawn.hosts = JSON.stringify(names);
      const was = hostSel.value;
      hostSel.replaceChildren(...names.map((n) => h('option', { value: n }, n)));
      if (names.includes(was)) hostSel.value = was;
    }
    redraw(disks, sh.disks, () => (sh.disks.length ? h('table', {},
      h('thead', {}, h('tr', {}, ['Disk', 'Size', 'Allocated', 'Write lease', 'URI'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, sh.disks.map((d) => h('tr', {}, h('td', {}, d.name), h('td', {}, human(d.size_bytes)), h('td', {}, human(d.allocated_bytes)),
        h('td', {}, d.lease.holder ? `${d.lease.holder} (fence ${d.lease.fence})` : 'nobody'), h('td', {}, d.uri || d.export))))) : h('p', {}, 'No disks.')));
  };
  return { node, fill };
}

// ---- routing and the live overview -----------------------------------------------------

function route() {
  if (view && view.close) view.close();
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === (parts[0] || 'hosts')) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (parts[0] === 'vm' && parts[1]) view = vmView(parts[1]);
  else if (parts[0] === 'shares') view = sharesView();
  else view = hostsView();
  document.title = `${main.querySelector('h1')?.textContent || 'ferry'} · ferry`;
}

function watch() {
  const banner = document.getElementById('conn');
  const es = new EventSource('/api/watch');
  es.addEventListener('overview', (e) => {
    overview = JSON.parse(e.data);
    banner.hidden = true;
    if (view) view.update();
  });
  es.onerror = async () => {
    banner.hidden = false;
    banner.textContent = 'Lost contact with ferry ui; retrying…';
    const r = await fetch('/api/session', { credentials: 'same-origin' }).catch(() => null);
    if (r && r.status === 401) location.href = '/login';
  };
}

async function start() {
  session = await api('GET', '/session');
  document.getElementById('who').textContent = `${session.admin} · ferry ${session.version}`;
  document.getElementById('logout').addEventListener('click', async () => {
    await api('POST', '/logout', {});
    location.href = '/login';
  });
  window.addEventListener('hashchange', route);
  route();
  watch();
}

start();
