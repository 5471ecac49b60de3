// E2B core conformance with the unmodified `e2b` npm SDK: create, commands.run, files read/write,
// kill. Run by crates/burrow-cli/tests/e2b.rs with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY
// pointing at a real `burrow up`. Prints `ok <name>` or `FAIL <name>`; exits with the failures.
import { Sandbox, CommandExitError, NotFoundError } from 'e2b'
import { check, eq, finish } from './checks.mjs'

const run = String(Date.now())
const sbx = await Sandbox.create({ metadata: { suite: 'js-core', run } })

await check('create and list', async () => {
  const info = await sbx.getInfo()
  eq(info.sandboxId, sbx.sandboxId, 'id')
  eq(info.metadata.run, run, 'metadata')
  const page = await Sandbox.list({ query: { metadata: { run } } }).nextItems()
  eq(page.map((s) => s.sandboxId), [sbx.sandboxId], 'listed by metadata')
})

await check('commands.run', async () => {
  const r = await sbx.commands.run('echo hello from $WHO; echo err >&2', { envs: { WHO: 'node' } })
  eq(r.stdout, 'hello from node\n', 'stdout')
  eq(r.stderr, 'err\n', 'stderr')
  eq(r.exitCode, 0, 'exit code')
  try {
    await sbx.commands.run('exit 7')
    throw new Error('no CommandExitError')
  } catch (e) {
    if (!(e instanceof CommandExitError)) throw e
    eq(e.exitCode, 7, 'failing exit code')
  }
  const bg = await sbx.commands.run('sleep 0.5; echo done', { background: true })
  eq((await bg.wait()).stdout, 'done\n', 'background')
})

await check('files read and write', async () => {
  await sbx.files.write('/home/user/js/hello.txt', 'hello from js')
  eq(await sbx.files.read('/home/user/js/hello.txt'), 'hello from js', 'read back')
  const bytes = await sbx.files.read('/home/user/js/hello.txt', { format: 'bytes' })
  eq(Buffer.from(bytes).toString(), 'hello from js', 'bytes')
  await sbx.files.write([
    { path: '/home/user/js/a.txt', data: 'A' },
    { path: '/home/user/js/b.txt', data: 'B' },
  ])
  const names = (await sbx.files.list('/home/user/js')).map((e) => e.name).sort()
  eq(names, ['a.txt', 'b.txt', 'hello.txt'], 'listing')
  eq((await sbx.commands.run('cat /home/user/js/a.txt /home/user/js/b.txt')).stdout, 'AB', 'seen by commands')
})

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
async function until(pred, what) {
  for (let i = 0; i < 75; i++) {
    if (pred()) return
    await sleep(200)
  }
  throw new Error(`${what} did not happen within 15 s`)
}

await check('watchDir (streaming)', async () => {
  await sbx.files.makeDir('/home/user/jsw')
  const events = []
  const handle = await sbx.files.watchDir('/home/user/jsw', (e) => events.push(e))
  await sbx.files.write('/home/user/jsw/x.txt', 'x')
  await until(() => events.some((e) => e.name === 'x.txt'), 'a watch event for x.txt')
  await handle.stop()
})

await check('pty', async () => {
  let out = ''
  const term = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { out += Buffer.from(d).toString() } })
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; echo js-$((6*7))\n'))
  await until(() => out.includes('js-42'), 'pty output')
  if (!out.includes('24 80')) throw new Error(`pty size: ${out}`)
  await sbx.pty.resize(term.pid, { cols: 100, rows: 30 })
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size\n'))
  await until(() => out.includes('30 100'), 'resized pty')
  eq(await sbx.pty.kill(term.pid), true, 'pty kill')
})

await check('kill', async () => {
  eq(await sbx.kill(), true, 'kill answers true')
  eq(await Sandbox.kill(sbx.sandboxId), false, 'a second kill answers false')
  try {
    await Sandbox.getInfo(sbx.sandboxId)
    throw new Error('getInfo after kill succeeded')
  } catch (e) {
    if (!(e instanceof NotFoundError) && !/not found/i.test(String(e?.message))) throw e
  }
})

finish()
