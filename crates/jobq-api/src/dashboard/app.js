// The jobq dashboard: queues, jobs, dead letters and schedules, through the REST API under
// /api/v1 (the key typed in the header is sent as a Bearer token). Every value from the API is
// put in the page as text, never as markup.
'use strict';

const KEY = 'jobq.apiKey';
const state = { tab: 'queues', timer: null, pollingSince: 0, pollFailed: false, jobsCursor: null, jobsFilter: null, dlqCursor: null, dlqFilter: null };

// Calls `method template` with the {placeholders} of `template` filled from `params`
// (URL-encoded), the remaining params as the query string and `body` as JSON.
async function call(method, template, params = {}, body) {
  const rest = { ...params };
  let path = template.replace(/\{(\w+)\}/g, (_, k) => {
    const v = rest[k];
    delete rest[k];
    return encodeURIComponent(v);
  });
  const query = new URLSearchParams(Object.entries(rest).filter(([, v]) => v !== '' && v != null));
  if ([...query].length) path += '?' + query;
  const headers = {};
  const key = localStorage.getItem(KEY);
  if (key) headers.Authorization = 'Bearer ' + key;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!resp.ok) {
    const msg = data && data.error ? `${data.error.code}: ${data.error.message}` : `HTTP ${resp.status}`;
    throw new Error(msg);
  }
  return data;
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'onclick') e.addEventListener('click', v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c == null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function num(v) { return el('td', { class: 'num' }, v == null ? '' : Number(v).toLocaleString()); }
function when(t) { return t ? new Date(t).toLocaleString() : ''; }
function age(ms) {
  if (!ms || ms < 0) return '';
  const s = Math.round(ms / 1000);
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.round(s / 60) + ' min';
  if (s < 86400) return (s / 3600).toFixed(1) + ' h';
  return (s / 86400).toFixed(1) + ' d';
}
function pill(text, kind) { return el('span', { class: 'pill' + (kind ? ' ' + kind : '') }, text); }
function stateKind(s) { return s === 'dead' || s === 'cancelled' ? 'bad' : s === 'succeeded' ? 'ok' : ''; }
function btn(label, onclick, danger) { return el('button', { type: 'button', class: danger ? 'danger' : '', onclick }, label); }
function pre(v) { return el('pre', {}, JSON.stringify(v, null, 2)); }

function status(text, isError) {
  // Whatever is shown now is not the queues refresh's own error any more.
  state.pollFailed = false;
  const s = document.getElementById('status');
  s.textContent = text || '';
  s.className = isError ? 'error' : '';
}

// Runs an action, reporting its failure in the status line instead of throwing.
async function act(what, f) {
  try {
    await f();
    return true;
  } catch (e) {
    status(`${what}: ${e.message}`, true);
    return false;
  }
}

// ---- Queues ----

// The 2 s refresh of the queues tab: one at a time (unless the one in flight hangs for 10 s).
async function pollQueues() {
  if (state.pollingSince && Date.now() - state.pollingSince < 10000) return;
  const since = Date.now();
  state.pollingSince = since;
  try {
    await loadQueues();
  } finally {
    if (state.pollingSince === since) state.pollingSince = 0;
  }
}

// Loads the queues table. A failure shows in the status line; the next load that succeeds
// clears it, and only it, never what an action reported since.
async function loadQueues() {
  const ok = await act('queues', async () => {
    const data = await call('GET', '/api/v1/queues');
    const body = document.getElementById('queues-body');
    body.replaceChildren(...data.items.map((q) => {
      const c = q.counts || {};
      const queued = q.queued || {};
      const toggle = q.paused
        ? btn('Resume', () => act('resume', async () => { await call('POST', '/api/v1/queues/{queue}/resume', { queue: q.queue }); loadQueues(); }))
        : btn('Pause', () => act('pause', async () => { await call('POST', '/api/v1/queues/{queue}/pause', { queue: q.queue }); loadQueues(); }));
      return el('tr', {},
        el('td', {}, el('code', {}, q.queue)),
        num(queued.critical), num(queued.high), num(queued.normal), num(queued.low),
        // dead is null while Postgres does not answer: blank, not 0.
        num(q.running), num(q.scheduled), num(q.dead), num(c.succeeded || 0), num(c.failed || 0),
        el('td', {}, age(q.oldest_age_ms)),
        el('td', {}, q.paused ? pill('paused', 'bad') : pill('running', 'ok')),
        el('td', { class: 'row-actions' }, toggle, ' ', btn('Run waiting now', () => runQueue(q.queue)), ' ',
          btn('Cancel waiting', () => cancelQueue(q.queue), true)));
    }));
    if (!data.items.length) body.replaceChildren(el('tr', {}, el('td', { colspan: 13, class: 'muted' }, 'No queues yet.')));
  });
  if (!ok) state.pollFailed = true;
  else if (state.pollFailed) status('');
  return ok;
}

async function cancelQueue(queue) {
  await act('cancel', async () => {
    const dry = await call('POST', '/api/v1/queues/{queue}/cancel', { queue }, {});
    if (!dry.matched) { status(`Queue ${queue} has no job waiting to start.`); return; }
    const many = dry.more ? `at least ${dry.matched}` : `${dry.matched}`;
    if (!confirm(`Cancel ${many} job(s) of queue ${queue} that have not started (queued, scheduled, retrying)? Running jobs go on.`)) return;
    const done = await call('POST', '/api/v1/queues/{queue}/cancel', { queue }, { confirm: true });
    await loadQueues();
    status(`${done.cancelled} job(s) of queue ${queue} cancelled${done.more ? '; more are left, cancel again' : ''}.`);
  });
}

async function runQueue(queue) {
  await act('run', async () => {
    const dry = await call('POST', '/api/v1/queues/{queue}/run', { queue }, {});
    if (!dry.matched) { status(`Queue ${queue} has no scheduled or retrying job.`); return; }
    const many = dry.more ? `at least ${dry.matched}` : `${dry.matched}`;
    if (!confirm(`Queue ${many} scheduled or retrying job(s) of queue ${queue} now, instead of at their run_at?`)) return;
    const done = await call('POST', '/api/v1/queues/{queue}/run', { queue }, { confirm: true });
    await loadQueues();
    status(`${done.queued} job(s) of queue ${queue} queued now${done.more ? '; more are left, run again' : ''}.`);
  });
}

// ---- Jobs ----

async function showJob(id) {
  await act('job', async () => {
    const job = await call('GET', '/api/v1/jobs/{id}', { id });
    const runs = await call('GET', '/api/v1/jobs/{id}/executions', { id });
    const rows = (runs.items || []).map((x) => el('tr', {},
      num(x.run), num(x.attempt), el('td', {}, pill(x.outcome, stateKind(x.outcome))),
      el('td', {}, x.error || ''), el('td', {}, x.worker || ''), el('td', {}, when(x.started_at)), el('td', {}, when(x.finished_at))));
    const cancellable = !['succeeded', 'dead', 'cancelled'].includes(job.state);
    const waiting = job.state === 'scheduled' || job.state === 'retrying';
    document.getElementById('job-detail').replaceChildren(
      el('h3', {}, 'Job ', el('code', {}, job.id), ' ', pill(job.state, stateKind(job.state)), ' ',
        waiting ? btn('Run now', () => act('run', async () => { await call('POST', '/api/v1/jobs/{id}/run', { id }); showJob(id); })) : null, ' ',
        cancellable ? btn('Cancel', () => act('cancel', async () => { await call('DELETE', '/api/v1/jobs/{id}', { id }); showJob(id); }), true) : null),
      pre(job),
      el('h4', {}, 'Attempts'),
      el('table', {}, el('thead', {}, el('tr', {}, ['run', 'attempt', 'outcome', 'error', 'worker', 'started', 'finished'].map((h) => el('th', {}, h)))),
        el('tbody', {}, rows.length ? rows : el('tr', {}, el('td', { colspan: 7, class: 'muted' }, 'No attempt recorded yet.')))));
  });
}

async function loadJobs(more) {
  // "More" continues the listing shown, with its filter, whatever the form holds now.
  if (!more || !state.jobsFilter) {
    const f = new FormData(document.getElementById('jobs-filter'));
    state.jobsFilter = { queue: f.get('queue'), state: f.get('state'), type: f.get('type') };
  }
  const params = { ...state.jobsFilter, limit: 50 };
  if (more && state.jobsCursor) params.cursor = state.jobsCursor;
  await act('jobs', async () => {
    const page = await call('GET', '/api/v1/jobs', params);
    const rows = page.items.map((j) => el('tr', {},
      el('td', {}, el('code', {}, j.id)), el('td', {}, j.type), el('td', {}, j.queue),
      el('td', {}, pill(j.state, stateKind(j.state))), num(j.attempt), el('td', {}, when(j.created_at)),
      el('td', {}, btn('Show', () => showJob(j.id)))));
    const body = document.getElementById('jobs-body');
    if (more) body.append(...rows); else body.replaceChildren(...rows);
    state.jobsCursor = page.next_cursor || null;
    document.getElementById('jobs-more').hidden = !state.jobsCursor;
    status(`${body.children.length} job(s) shown`);
  });
}

// ---- Dead letters ----

function dlqFilter() {
  const f = new FormData(document.getElementById('dlq-filter'));
  return { queue: f.get('queue'), type: f.get('type'), error: f.get('error') };
}

async function showDead(id) {
  await act('dead job', async () => {
    const d = await call('GET', '/api/v1/dlq/{id}', { id });
    document.getElementById('dlq-detail').replaceChildren(el('h3', {}, 'Dead job ', el('code', {}, id)), pre(d));
  });
}

async function retryDead(id) {
  if (await act('retry', () => call('POST', '/api/v1/dlq/{id}/retry', { id }))) {
    await loadDlq(false);
    status(`Job ${id} queued again.`);
  }
}

async function deleteDead(id) {
  if (!confirm(`Delete dead job ${id} from the DLQ? Its history stays.`)) return;
  if (await act('delete', () => call('DELETE', '/api/v1/dlq/{id}', { id }))) {
    await loadDlq(false);
    status(`Job ${id} deleted from the DLQ.`);
  }
}

async function retryMatching() {
  const filter = Object.fromEntries(Object.entries(dlqFilter()).filter(([, v]) => v));
  const named = Object.entries(filter).map(([k, v]) => `${k} ${JSON.stringify(v)}`).join(', ') || 'no filter: every dead job';
  await act('retry by filter', async () => {
    const dry = await call('POST', '/api/v1/dlq/retry', {}, { ...filter, dry_run: true });
    if (!dry.matched) { status('No dead job matches.'); return; }
    if (!confirm(`Queue ${dry.matched} dead job(s) again (${named})?`)) return;
    const started = await call('POST', '/api/v1/dlq/retry', {}, filter);
    status(`Replaying ${started.matched} job(s) in the background; progress is in the audit log.`);
  });
}

async function loadDlq(more) {
  // "More" continues the listing shown, with its filter, whatever the form holds now.
  if (!more || !state.dlqFilter) state.dlqFilter = dlqFilter();
  const params = { ...state.dlqFilter, limit: 50 };
  if (more && state.dlqCursor) params.cursor = state.dlqCursor;
  await act('dead letters', async () => {
    const page = await call('GET', '/api/v1/dlq', params);
    const rows = page.items.map((d) => el('tr', {},
      el('td', {}, el('code', {}, d.job_id)), el('td', {}, d.type), el('td', {}, d.queue), el('td', {}, pill(d.reason, 'bad')),
      el('td', {}, d.last_error || ''), num(d.attempts), el('td', {}, when(d.failed_at)),
      el('td', { class: 'row-actions' }, btn('Show', () => showDead(d.job_id)), ' ', btn('Retry', () => retryDead(d.job_id)), ' ',
        btn('Delete', () => deleteDead(d.job_id), true))));
    const body = document.getElementById('dlq-body');
    if (more) body.append(...rows); else body.replaceChildren(...rows);
    state.dlqCursor = page.next_cursor || null;
    document.getElementById('dlq-more').hidden = !state.dlqCursor;
    status(`${body.children.length} dead job(s) shown`);
  });
}

// ---- Schedules ----

async function showRuns(name) {
  await act('runs', async () => {
    const runs = await call('GET', '/api/v1/schedules/{name}/runs', { name });
    document.getElementById('schedule-detail').replaceChildren(el('h3', {}, 'Recent runs of ', el('code', {}, name)), pre(runs));
  });
}

async function loadSchedules() {
  await act('schedules', async () => {
    const data = await call('GET', '/api/v1/schedules');
    const rows = data.items.map((s) => el('tr', {},
      el('td', {}, el('code', {}, s.name)), el('td', {}, el('code', {}, s.cron)), el('td', {}, s.timezone),
      el('td', {}, s.job && s.job.type), el('td', {}, (s.next_fires || []).slice(0, 3).map(when).join(', ')),
      el('td', {}, when(s.last_fired_at)), el('td', {}, s.enabled ? pill('yes', 'ok') : pill('no', 'bad')),
      el('td', { class: 'row-actions' },
        btn('Trigger', () => act('trigger', async () => {
          const job = await call('POST', '/api/v1/schedules/{name}/trigger', { name: s.name });
          status(`Fired ${s.name}: job ${job.id}`);
        })), ' ',
        btn(s.enabled ? 'Disable' : 'Enable', () => act('update', async () => {
          await call('PATCH', '/api/v1/schedules/{name}', { name: s.name }, { enabled: !s.enabled });
          loadSchedules();
        }), s.enabled), ' ',
        btn('Runs', () => showRuns(s.name)))));
    document.getElementById('schedules-body').replaceChildren(...(rows.length ? rows
      : [el('tr', {}, el('td', { colspan: 8, class: 'muted' }, 'No schedules.'))]));
  });
}

// ---- Tabs ----

function show(tab) {
  state.tab = ['queues', 'jobs', 'dlq', 'schedules'].includes(tab) ? tab : 'queues';
  for (const s of document.querySelectorAll('main > section')) s.hidden = s.id !== 'tab-' + state.tab;
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.dataset.tab === state.tab);
  clearInterval(state.timer);
  status('');
  if (state.tab === 'queues') { pollQueues(); state.timer = setInterval(pollQueues, 2000); }
  if (state.tab === 'jobs') loadJobs(false);
  if (state.tab === 'dlq') loadDlq(false);
  if (state.tab === 'schedules') loadSchedules();
}

function submit(id, f) {
  document.getElementById(id).addEventListener('submit', (e) => { e.preventDefault(); f(new FormData(e.target)); });
}

document.getElementById('api-key').value = localStorage.getItem(KEY) || '';
submit('key-box', () => {
  const v = document.getElementById('api-key').value.trim();
  if (v) localStorage.setItem(KEY, v); else localStorage.removeItem(KEY);
  show(state.tab);
});
submit('jobs-find', (f) => { const id = (f.get('id') || '').trim(); if (id) showJob(id); });
submit('jobs-filter', () => loadJobs(false));
submit('dlq-filter', () => loadDlq(false));
document.getElementById('jobs-more').addEventListener('click', () => loadJobs(true));
document.getElementById('dlq-more').addEventListener('click', () => loadDlq(true));
document.getElementById('dlq-retry-all').addEventListener('click', retryMatching);
window.addEventListener('hashchange', () => show(location.hash.slice(1)));
show(location.hash.slice(1));
