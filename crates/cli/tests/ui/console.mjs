// Drives ferry's web console in Debian's chromium (playwright-core; no browser download), one
// scenario per run: `node console.mjs SCENARIO`. crates/cli/tests/ui.rs starts the lab, the
// daemons and `ferry ui`, runs a scenario, and checks the real outcome on the hosts.
//
// Environment: FERRY_UI_BASE (https://ADDR:PORT), FERRY_UI_LINK (a one-time login link),
// FERRY_UI_SHOTS (a folder for screenshots), FERRY_UI_VM (the VM's name), FERRY_UI_TO (the
// cancel scenario's destination host), FERRY_UI_DEST (the storage scenario's destination).
// Prints one JSON line (`RESULT {...}`) with what it saw; exits non-zero on any failed
// expectation or page error, saying which.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const scenario = process.argv[2];
const base = process.env.FERRY_UI_BASE;
const link = process.env.FERRY_UI_LINK;
const shots = process.env.FERRY_UI_SHOTS;
const vm = process.env.FERRY_UI_VM || 'web01';
const T = 60_000;
mkdirSync(shots, { recursive: true });

function expect(cond, what) {
  if (!cond) throw new Error(`expected: ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.FERRY_CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
// The console's certificate is self-signed here (ferry prints its fingerprint for people).
const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 900 } });
const page = await ctx.newPage();
const errors = [];
page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
// Refused calls the page handles show up as "Failed to load resource"; anything else is a bug.
page.on('console', (m) => {
  if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(`console error: ${m.text()}`);
});
let shot = 0;
async function snap(name) {
  shot += 1;
  const path = `${shots}/${scenario}-${String(shot).padStart(2, '0')}-${name}.png`;
  await page.screenshot({ path, fullPage: true });
  return path;
}

async function login() {
  const r = await page.goto(link);
  expect(r.ok(), `the login link to work (got ${r.status()})`);
  await page.waitForURL(`${base}/`, { timeout: T });
  expect(!page.url().includes('token'), 'no credentials in the URL after login');
  await page.getByRole('heading', { name: 'Hosts', level: 1 }).waitFor({ timeout: T });
}

async function openVm() {
  await page.goto(`${base}/#/vm/${encodeURIComponent(vm)}`);
  await page.getByRole('button', { name: 'Move…' }).waitFor({ timeout: T });
  // Wait for the live overview to have the VM.
  await page.locator('[data-fact=state]').waitFor({ timeout: T });
}

const wizard = () => page.getByRole('region', { name: `Move ${vm}` });

/** Steps 1 and 2 of the wizard: move the VM to `to`, with a bandwidth cap. */
async function wizardTo(to, bandwidth) {
  await page.getByRole('button', { name: 'Move…' }).click();
  const w = wizard();
  await w.getByRole('radio', { name: 'The virtual machine', exact: true }).check();
  await snap('step1-what');
  await w.getByRole('button', { name: 'Next' }).click();
  await w.getByLabel('Destination host').selectOption(to);
  if (bandwidth) await w.getByLabel('Bandwidth cap (Mbit/s, 0: none)').fill(String(bandwidth));
  await snap('step2-destination');
  await w.getByRole('button', { name: 'Next' }).click();
  await w.getByRole('list', { name: 'Check results' }).waitFor({ timeout: T });
  return w;
}

/** Steps 1 and 2 for the VM's storage: its disks to `dest` (a folder or SERVER:SHARE). */
async function wizardStorage(dest) {
  await page.getByRole('button', { name: 'Move…' }).click();
  const w = wizard();
  await w.getByRole('radio', { name: 'The virtual machine\'s storage' }).check();
  await snap('step1-what');
  await w.getByRole('button', { name: 'Next' }).click();
  await w.getByLabel('Destination for the disks').fill(dest);
  await snap('step2-destination');
  await w.getByRole('button', { name: 'Next' }).click();
  await w.getByRole('list', { name: 'Check results' }).waitFor({ timeout: T });
  return w;
}

/** A report's facts (dt: dd) and its disk rows, read from the page. */
async function factsOf(r) {
  const facts = {};
  const dts = await r.locator('dl dt').allTextContents();
  const dds = await r.locator('dl dd').allTextContents();
  dts.forEach((k, i) => { facts[k] = dds[i]; });
  const disks = [];
  for (const row of await r.locator('tbody tr').all()) disks.push(await row.locator('td').allTextContents());
  if (disks.length) facts.disks = disks;
  return facts;
}

/** Steps 3 and 4, then Start: returns the move's id once it runs. */
async function checkAndStart(w) {
  await w.getByText(/can move from/).waitFor({ timeout: T });
  await snap('step3-check');
  await w.getByRole('button', { name: 'Next' }).click();
  await w.getByLabel('Summary').waitFor();
  await snap('step4-summary');
  await w.getByRole('button', { name: 'Start move' }).click();
  const bar = page.getByRole('progressbar', { name: 'Move progress' });
  await bar.waitFor({ timeout: T });
  return page.locator('[data-move]').first().getAttribute('data-move');
}

async function reportOf() {
  const r = page.getByRole('region', { name: 'Move report' });
  await r.waitFor({ timeout: 3 * T });
  return factsOf(r);
}

const result = {};
try {
  if (scenario === 'refusals') {
    // Nothing answers before login: the API, the page, a forged login.
    const api = await ctx.request.get(`${base}/api/overview`);
    result.api_status = api.status();
    result.api_code = (await api.json()).code;
    const post = await ctx.request.post(`${base}/api/moves`, { data: { vm, host: 'hv1', to: 'hv2' } });
    result.post_status = post.status();
    await page.goto(`${base}/`);
    result.page_url = page.url();
    await page.getByLabel('Login token').waitFor();
    const bad = await page.goto(`${base}/login?token=0123456789abcdef`);
    result.bad_token_status = bad.status();
    expect(await page.getByRole('alert').textContent().then((t) => t.includes('used already or is wrong')), 'a wrong token to be refused with a reason');
    errors.length = 0; // the 401/403s above are expected console errors
    // Logged in: a changing call without the CSRF header, and one from another origin.
    await login();
    result.no_csrf = await page.evaluate(async (vm) => {
      const r = await fetch('/api/moves', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ vm, host: 'hv1', to: 'hv2' }) });
      return { status: r.status, code: (await r.json()).code };
    }, vm);
    const cross = await ctx.request.patch(`${base}/api/hosts/hv1/host`, { data: { live_migration: true }, headers: { origin: 'https://evil.example' } });
    result.cross_origin_status = cross.status();
    // The login link worked once.
    const again = await browser.newContext({ ignoreHTTPSErrors: true });
    const p2 = await again.newPage();
    result.reused_link_status = (await p2.goto(link)).status();
    await again.close();
    errors.length = 0;
  } else if (scenario === 'failed-check') {
    await login();
    await openVm();
    const w = await wizardTo('hv2');
    await w.getByRole('alert').filter({ hasText: 'cannot move' }).waitFor({ timeout: T });
    await snap('step3-check-failed');
    result.alert = await w.getByRole('alert').first().textContent();
    result.problems = await w.locator('li[data-ok=false]').allTextContents();
    result.fixes = await w.locator('li[data-ok=false] .fix').allTextContents();
    result.can_go_on = await w.getByRole('button', { name: 'Next' }).count();
    result.can_start = await w.getByRole('button', { name: 'Start move' }).count();
  } else if (scenario === 'settings') {
    await login();
    for (const host of ['hv1', 'hv2']) {
      const form = page.getByRole('form', { name: `Migration settings of ${host}` });
      // A bad value first: the daemon's own check answers, and nothing changes.
      await form.getByLabel('Migration networks').fill('not-a-network');
      await form.getByRole('button', { name: 'Save settings' }).click();
      await form.getByRole('alert').waitFor({ timeout: T });
      result[`${host}_bad_networks`] = await form.getByRole('alert').textContent();
      await form.getByLabel('Migration networks').fill('');
      await form.getByLabel('Allow this host to send and receive live migrations').check();
      await form.getByRole('button', { name: 'Save settings' }).click();
      await form.getByText('Saved: live migration on').waitFor({ timeout: T });
    }
    // The facts follow live, without a reload.
    await page.locator('section[aria-labelledby=host-hv2] [data-fact=live-migration]').filter({ hasText: 'on' }).waitFor({ timeout: T });
    await snap('hosts-live-migration-on');
  } else if (scenario === 'move') {
    await login();
    await openVm();
    // The serial console, live: ask the guest for its status.
    const con = page.getByLabel(/Serial console/);
    await page.waitForTimeout(500);
    await con.click();
    await page.keyboard.press('s');
    await page.locator('pre.console').filter({ hasText: 'STATUS' }).waitFor({ timeout: T });
    result.console = (await con.textContent()).split('\n').find((l) => l.includes('STATUS'));
    const w = await wizardTo('hv2');
    result.id = await checkAndStart(w);
    await snap('moving');
    result.report = await reportOf();
    await snap('report');
    // The page follows the VM to its new host by itself.
    await page.locator('[data-fact=host]').filter({ hasText: 'hv2' }).waitFor({ timeout: T });
    result.host_after = await page.locator('[data-fact=host]').textContent();
  } else if (scenario === 'cancel') {
    await login();
    await openVm();
    result.from = await page.locator('[data-fact=host]').textContent();
    const w = await wizardTo(process.env.FERRY_UI_TO, 80);
    result.id = await checkAndStart(w);
    // Cancel once memory is on its way.
    const bar = page.getByRole('progressbar', { name: 'Move progress' });
    const deadline = Date.now() + T;
    while (Number(await bar.evaluate((b) => b.value)) === 0) {
      expect(Date.now() < deadline, 'the move to start copying');
      await page.waitForTimeout(50);
    }
    await snap('moving');
    await wizard().getByRole('button', { name: 'Cancel move' }).click();
    result.report = await reportOf();
    await snap('cancelled');
  } else if (scenario === 'shares') {
    await login();
    await page.getByRole('navigation', { name: 'Main' }).getByRole('link', { name: 'Shares' }).click();
    await page.getByRole('heading', { name: 'Shares', level: 1 }).waitFor({ timeout: T });
    const vms = page.getByRole('region', { name: 'fs1: vms', exact: true });
    await vms.waitFor({ timeout: T });
    // Give hv2 "Full Control" of vms: the access list follows live.
    const grant = vms.getByRole('form', { name: 'Grant access to vms' });
    await grant.getByLabel('Host', { exact: true }).selectOption('hv2');
    await grant.getByLabel('Access', { exact: true }).selectOption('write');
    await grant.getByRole('button', { name: 'Grant' }).click();
    await vms.getByText('hv2 may read and write vms.').waitFor({ timeout: T });
    await vms.getByRole('row').filter({ hasText: 'hv2' }).filter({ hasText: 'read and write' }).waitFor({ timeout: T });
    result.vms_access = await vms.locator('table').first().locator('tbody tr').allTextContents();
    // Take hv1's read access to scratch away.
    const scratch = page.getByRole('region', { name: 'fs1: scratch', exact: true });
    await scratch.getByRole('button', { name: 'Revoke hv1\'s access to scratch' }).click();
    await scratch.getByText('No host may open its disks.').waitFor({ timeout: T });
    result.scratch_status = await scratch.getByRole('status').first().textContent();
    await snap('shares');
  } else if (scenario === 'storage') {
    await login();
    await openVm();
    const w = await wizardStorage(process.env.FERRY_UI_DEST);
    result.id = await checkAndStart(w);
    await snap('copying');
    result.report = await reportOf();
    await snap('report');
    // The VM page says where its disk lives now, and who holds the write lease.
    const disks = page.getByRole('region', { name: 'Disks' });
    await disks.getByRole('cell', { name: /^share / }).waitFor({ timeout: T });
    result.disk_row = await disks.locator('tbody tr').first().locator('td').allTextContents();
  } else if (scenario === 'evacuate') {
    await login();
    const host = page.getByRole('region', { name: 'hv1', exact: true });
    await host.getByRole('button', { name: 'Evacuate hv1…' }).click();
    await host.getByRole('checkbox', { name: 'hv2', exact: true }).check();
    await snap('evacuate-form');
    await host.getByRole('button', { name: 'Start evacuation' }).click();
    const rows = page.getByRole('region', { name: 'Evacuation of hv1' });
    // One progress row per VM, each with its own report.
    await rows.getByRole('progressbar').first().waitFor({ timeout: T });
    result.bars = await rows.getByRole('progressbar').evaluateAll((bs) => bs.map((b) => b.getAttribute('aria-label')));
    await snap('evacuating');
    result.reports = {};
    for (const card of await rows.locator('.card').all()) {
      const title = await card.locator('h4').textContent();
      const r = card.getByRole('region', { name: 'Move report' });
      await r.waitFor({ timeout: 3 * T });
      result.reports[title] = await factsOf(r);
    }
    await snap('evacuated');
    // The Hosts page follows: hv1 has no VM left.
    await host.getByText('No VMs.').waitFor({ timeout: T });
  } else if (scenario === 'logout') {
    await login();
    const [cookie] = (await ctx.cookies()).filter((c) => c.name === 'ferry_session');
    expect(cookie && cookie.httpOnly && cookie.secure && cookie.sameSite === 'Strict', `a HttpOnly, Secure, SameSite=Strict session cookie (${JSON.stringify(cookie)})`);
    await page.getByRole('button', { name: 'Log out' }).click();
    await page.waitForURL(`${base}/login`, { timeout: T });
    result.after_url = page.url();
    // The session is gone on the server too, not only from this browser.
    const fresh = await browser.newContext({ ignoreHTTPSErrors: true });
    const old = await fresh.request.get(`${base}/api/overview`, { headers: { cookie: `ferry_session=${cookie.value}` } });
    result.old_cookie_status = old.status();
    await fresh.close();
    errors.length = 0;
  } else {
    throw new Error(`no scenario ${scenario}`);
  }
  expect(errors.length === 0, `no page errors (${errors.join('; ')})`);
  console.log(`RESULT ${JSON.stringify(result)}`);
  await browser.close();
} catch (e) {
  await snap('failure').catch(() => {});
  console.error(`scenario ${scenario} failed: ${e.message}\nseen: ${JSON.stringify(result)}\n${errors.join('\n')}`);
  await browser.close();
  process.exit(1);
}
