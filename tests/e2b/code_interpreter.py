"""The unmodified `e2b-code-interpreter` Python SDK against burrow (docs/code-interpreter.md).

Run by crates/burrow-cli/tests/code_interpreter.rs with E2B_API_URL, E2B_SANDBOX_URL and
E2B_API_KEY pointing at a real server that has the code-interpreter template. Every check runs;
the script prints each result and exits with the number of failures.
"""

import base64
import statistics
import sys
import time
import traceback

from e2b import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import Sandbox

failures = []


def check(name):
    def run(fn):
        try:
            fn()
            print(f"ok   {name}", flush=True)
        except Exception:  # noqa: BLE001 - every check runs, failures are listed at the end
            failures.append(name)
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        return fn

    return run


def eq(got, want, what):
    assert got == want, f"{what}: got {got!r}, want {want!r}"


# The SDK's default template (code-interpreter-v1), as a user writes it. Times are printed for
# the docs, never asserted.
started = time.monotonic()
sbx = Sandbox.create()
print(f"sandbox {sbx.sandbox_id}: create took {time.monotonic() - started:.2f} s", flush=True)


@check("run_code: the value of the last expression")
def _():
    ex = sbx.run_code("x = 41\nx + 1")
    eq(ex.text, "42", "text")
    eq(ex.error, None, "error")
    main = [r for r in ex.results if r.is_main_result]
    eq(len(main), 1, "one main result")
    assert ex.execution_count and ex.execution_count >= 1, f"execution count {ex.execution_count}"


@check("state is kept between calls")
def _():
    eq(sbx.run_code("x").text, "41", "x from the previous cell")
    sbx.run_code("def double(v):\n    return 2 * v")
    eq(sbx.run_code("double(x)").text, "82", "a function from an earlier cell")


@check("stdout and stderr: logs and callbacks")
def _():
    out, err = [], []
    ex = sbx.run_code(
        "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    eq("".join(ex.logs.stdout), "to stdout\n", "logs.stdout")
    eq("".join(ex.logs.stderr), "to stderr\n", "logs.stderr")
    eq("".join(m.line for m in out), "to stdout\n", "on_stdout")
    eq("".join(m.line for m in err), "to stderr\n", "on_stderr")
    assert all(m.timestamp > 0 and not m.error for m in out), out
    assert all(m.error for m in err), err


@check("output streams while the cell runs")
def _():
    # The cell waits for a file that only the stdout callback creates: without streaming the
    # callback would run after the cell, and the cell would give up instead of saying "second".
    seen = []

    def on_stdout(msg):
        seen.append(msg.line)
        if msg.line.startswith("first"):
            sbx.files.write("/tmp/go", "go")

    ex = sbx.run_code(
        "import os, time\n"
        "print('first', flush=True)\n"
        "for _ in range(600):\n"
        "    if os.path.exists('/tmp/go'):\n"
        "        break\n"
        "    time.sleep(0.1)\n"
        "print('second' if os.path.exists('/tmp/go') else 'gave up')\n",
        on_stdout=on_stdout,
    )
    eq("".join(seen), "first\nsecond\n", "streamed lines")
    eq(ex.error, None, "error")


@check("an exception: name, value, traceback")
def _():
    errors = []
    ex = sbx.run_code(
        "def explode():\n    raise ValueError('boom')\nexplode()", on_error=errors.append
    )
    assert ex.error is not None, "execution.error"
    eq(ex.error.name, "ValueError", "name")
    eq(ex.error.value, "boom", "value")
    assert "explode" in ex.error.traceback and "ValueError" in ex.error.traceback, ex.error.traceback
    eq(len(errors), 1, "on_error calls")
    eq(ex.results, [], "no results")
    # The kernel carries on.
    eq(sbx.run_code("x").text, "41", "state after an error")


@check("display data: HTML, JSON and a matplotlib chart as PNG")
def _():
    ex = sbx.run_code("from IPython.display import HTML\nHTML('<b>bold</b>')")
    eq(ex.results[0].html, "<b>bold</b>", "html")
    ex = sbx.run_code("from IPython.display import JSON\nJSON({'a': [1, 2]})")
    eq(ex.results[0].json, {"a": [1, 2]}, "json")
    results = []
    ex = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [3, 1, 2])\n"
        "plt.title('burrow')\n"
        "plt.show()\n",
        on_result=results.append,
    )
    eq(ex.error, None, "error")
    pngs = [r for r in ex.results if r.png]
    eq(len(pngs), 1, "one PNG result")
    png = base64.b64decode(pngs[0].png)
    assert png.startswith(b"\x89PNG\r\n\x1a\n"), png[:16]
    assert not pngs[0].is_main_result, "a display, not the cell's value"
    assert "png" in pngs[0].formats(), pngs[0].formats()
    eq(len(results), 1, "on_result calls")


@check("envs apply to one cell only")
def _():
    ex = sbx.run_code("import os\nos.environ.get('GREETING')", envs={"GREETING": "hello"})
    eq(ex.text, "'hello'", "inside the cell")
    eq(sbx.run_code("os.environ.get('GREETING')").text, None, "next cell")


@check("contexts: create, run, list, restart, remove")
def _():
    ctx = sbx.create_code_context(cwd="/tmp")
    eq(ctx.language, "python", "language")
    eq(ctx.cwd, "/tmp", "cwd")
    eq(sbx.run_code("import os\nos.getcwd()", context=ctx).text, "'/tmp'", "cwd inside")
    # Its own kernel: the default context's variables are not there.
    ex = sbx.run_code("x", context=ctx)
    eq(ex.error.name if ex.error else None, "NameError", "isolated from the default context")
    sbx.run_code("y = 7", context=ctx)
    eq(sbx.run_code("y", context=ctx).text, "7", "state in the context")
    assert ctx.id in [c.id for c in sbx.list_code_contexts()], "listed"
    sbx.restart_code_context(ctx)
    ex = sbx.run_code("y", context=ctx)
    eq(ex.error.name if ex.error else None, "NameError", "restart clears state")
    sbx.remove_code_context(ctx.id)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()], "gone from the list"
    try:
        sbx.run_code("1", context=ctx)
        raise AssertionError("a removed context ran code")
    except NotFoundException:
        pass
    eq(sbx.run_code("x").text, "41", "the default context is untouched")


@check("other languages are refused by name")
def _():
    for lang in ["javascript", "r"]:
        try:
            sbx.run_code("1", language=lang)
            raise AssertionError(f"{lang} ran")
        except SandboxException as e:
            assert "501" in str(e) and lang in str(e), str(e)
        try:
            sbx.create_code_context(language=lang)
            raise AssertionError(f"a {lang} context was made")
        except SandboxException as e:
            assert "501" in str(e) and lang in str(e), str(e)
    eq(sbx.run_code("1 + 1", language="python").text, "2", "python by name")


@check("a timeout interrupts the cell and keeps the kernel")
def _():
    try:
        sbx.run_code("import time\ntime.sleep(600)\nlost = True", timeout=3)
        raise AssertionError("the cell outlived its timeout")
    except TimeoutException as e:
        assert "timed out" in str(e).lower(), str(e)
    # The next cell runs (the sleep was interrupted) and sees the state from before.
    eq(sbx.run_code("x").text, "41", "state after the timeout")
    eq(sbx.run_code("'lost' in globals()").text, "False", "the rest of the cell never ran")


@check("a kernel that dies is reported and replaced")
def _():
    ex = sbx.run_code("import os\nos._exit(1)")
    assert ex.error is not None, "an error"
    eq(ex.error.name, "KernelDied", "name")
    eq(sbx.run_code("1 + 2").text, "3", "a fresh kernel answers")


@check("commands and files still work in the same sandbox")
def _():
    eq(sbx.commands.run("echo hi").stdout, "hi\n", "commands.run")
    sbx.run_code("open('/home/user/from_kernel.txt', 'w').write('kernel')")
    eq(sbx.files.read("/home/user/from_kernel.txt"), "kernel", "a file the kernel wrote")


rounds = []
for _ in range(20):
    started = time.monotonic()
    sbx.run_code("1 + 1")
    rounds.append(time.monotonic() - started)
print(f"run_code('1 + 1') round trip: median {statistics.median(rounds) * 1000:.1f} ms", flush=True)

sbx.kill()
print(f"{len(failures)} failed: {failures}" if failures else "all checks passed", flush=True)
sys.exit(len(failures))
