// The unmodified `@e2b/code-interpreter` npm SDK against burrow (docs/code-interpreter.md): the
// core of tests/e2b/code_interpreter.py. Run by crates/burrow-cli/tests/code_interpreter.rs with
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY pointing at a real server that has the template.
// Prints `ok <name>` or `FAIL <name>`; exits with the number of failures.
import { Sandbox } from '@e2b/code-interpreter'
import { check, eq, finish } from './checks.mjs'


const sbx = await Sandbox.create()

await check('runCode: value and state', async () => {
  await sbx.runCode('x = 41')
  eq((await sbx.runCode('x + 1')).text, '42', 'text')
})

await check('streamed stdout and stderr', async () => {
  const out = []
  const err = []
  const ex = await sbx.runCode("import sys\nprint('out')\nprint('err', file=sys.stderr)", {
    onStdout: (m) => out.push(m.line),
    onStderr: (m) => err.push(m.line),
  })
  eq(out.join(''), 'out\n', 'onStdout')
  eq(err.join(''), 'err\n', 'onStderr')
  eq(ex.logs.stdout.join(''), 'out\n', 'logs.stdout')
})

await check('an exception', async () => {
  const ex = await sbx.runCode("raise KeyError('k')")
  eq(ex.error?.name, 'KeyError', 'name')
  eq(ex.error?.value, "'k'", 'value')
  if (!ex.error.traceback.includes('KeyError')) throw new Error(`traceback: ${ex.error.traceback}`)
})

await check('a PNG chart', async () => {
  const ex = await sbx.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()')
  const png = ex.results.find((r) => r.png)?.png
  if (!png) throw new Error(`no png in ${JSON.stringify(ex.results.map((r) => r.formats()))}`)
  eq(Buffer.from(png, 'base64').subarray(1, 4).toString(), 'PNG', 'magic')
})

await check('a context of its own', async () => {
  const ctx = await sbx.createCodeContext({ cwd: '/tmp' })
  eq((await sbx.runCode('import os\nos.getcwd()', { context: ctx })).text, "'/tmp'", 'cwd')
  eq((await sbx.runCode('x', { context: ctx })).error?.name, 'NameError', 'isolated')
  await sbx.removeCodeContext(ctx)
})

await check('javascript is refused', async () => {
  try {
    await sbx.runCode('1 + 1', { language: 'javascript' })
    throw new Error('javascript ran')
  } catch (e) {
    // This SDK keeps only the status of such an answer (the body names the language).
    if (!String(e?.message).includes('501 Not Implemented')) throw e
  }
})

await sbx.kill()
finish()
