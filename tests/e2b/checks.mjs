// The small harness the npm SDK scripts share (core.mjs, code_interpreter.mjs): every check runs,
// prints `ok <name>` or `FAIL <name>` with the stack, and `finish()` exits with the failures.
export const failures = []

export async function check(name, fn) {
  try {
    await fn()
    console.log(`ok ${name}`)
  } catch (e) {
    failures.push(name)
    console.log(`FAIL ${name}: ${e?.name}: ${e?.message}`)
    console.log(e?.stack)
  }
}

export function eq(got, want, what) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`)
  }
}

export function finish() {
  console.log(failures.length ? `${failures.length} failed: ${failures}` : 'all checks passed')
  process.exit(failures.length)
}
