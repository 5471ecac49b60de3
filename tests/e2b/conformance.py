"""E2B conformance: drives a burrow server with the unmodified `e2b` Python SDK.

Run by crates/burrow-cli/tests/e2b.rs with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY pointing at a
real `burrow up`. Each check prints `ok <name>` or `FAIL <name>: <why>`; the exit status is the
number of failures (0 = everything held). Set E2B_CONFORMANCE_PORT_PROXY=1 to also check
`get_host(port)` through burrow's port proxy (needs the networking work).
"""

import asyncio
import os
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request

from e2b import (
    AsyncSandbox,
    CommandExitException,
    FileNotFoundException,
    FileType,
    FilesystemEventType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)

RUN = str(int(time.time() * 1000))
failures = []


def check(name):
    def wrap(fn):
        try:
            skipped = fn()
            print(f"skip {name}: {skipped}" if skipped else f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
            failures.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        return fn

    return wrap


def eq(got, want, what=""):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def until(pred, secs=10.0, what="condition", missing_ok=False):
    """Polls `pred`. With `missing_ok`, a file the sandbox has not written yet counts as not yet."""
    deadline = time.time() + secs
    while time.time() < deadline:
        try:
            v = pred()
        except FileNotFoundException:
            if not missing_ok:
                raise
            v = None
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"{what} did not hold within {secs} s")


sbx = Sandbox.create(metadata={"suite": "conformance", "run": RUN}, timeout=600)
other = Sandbox.create(metadata={"suite": "other", "run": RUN})


@check("create: a running sandbox with info")
def _():
    info = sbx.get_info()
    eq(info.sandbox_id, sbx.sandbox_id, "id")
    eq(info.metadata.get("suite"), "conformance", "metadata")
    eq(info.state, SandboxState.RUNNING, "state")
    assert sbx.is_running(), "is_running"


@check("list: metadata filters and pagination")
def _():
    found = []
    pager = Sandbox.list(query=SandboxQuery(metadata={"run": RUN}), limit=1)
    while pager.has_next:
        found.extend(s.sandbox_id for s in pager.next_items())
    eq(sorted(found), sorted([sbx.sandbox_id, other.sandbox_id]), "both by run")
    only = Sandbox.list(query=SandboxQuery(metadata={"run": RUN, "suite": "other"})).next_items()
    eq([s.sandbox_id for s in only], [other.sandbox_id], "filtered by two keys")
    none = Sandbox.list(query=SandboxQuery(metadata={"run": "no-such-run"})).next_items()
    eq(none, [], "no match")


@check("set_timeout")
def _():
    sbx.set_timeout(900)
    info = sbx.get_info()
    assert info.end_at > info.started_at, "end after start"


@check("commands.run: foreground, env, cwd, exit codes")
def _():
    r = sbx.commands.run("echo hello; echo oops >&2")
    eq(r.stdout, "hello\n", "stdout")
    eq(r.stderr, "oops\n", "stderr")
    eq(r.exit_code, 0, "exit code")
    r = sbx.commands.run("echo $GREETING-$PWD", envs={"GREETING": "hi"}, cwd="/tmp")
    eq(r.stdout.strip(), "hi-/tmp", "env and cwd")
    eq(sbx.commands.run("whoami").stdout.strip(), "user", "default user")
    eq(sbx.commands.run("whoami", user="root").stdout.strip(), "root", "root user")
    try:
        sbx.commands.run("exit 3")
        raise AssertionError("no CommandExitException")
    except CommandExitException as e:
        eq(e.exit_code, 3, "exit code of a failure")
    seen = []
    sbx.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=seen.append)
    eq("".join(seen), "line1\nline2\nline3\n", "streamed stdout")


@check("commands.run: timeout")
def _():
    t0 = time.time()
    try:
        sbx.commands.run("sleep 30", timeout=2)
        raise AssertionError("sleep 30 finished under a 2 s timeout")
    except (TimeoutException, CommandExitException):
        pass
    assert time.time() - t0 < 20, "the timeout did not stop the command"


@check("commands: background, list, connect by pid, kill")
def _():
    h = sbx.commands.run("for i in $(seq 1 50); do echo tick$i; sleep 0.2; done", background=True)
    pids = [p.pid for p in sbx.commands.list()]
    assert h.pid in pids, f"{h.pid} not in {pids}"
    h.disconnect()
    again = sbx.commands.connect(h.pid)
    r = again.wait()
    eq(r.exit_code, 0, "background exit")
    assert "tick50" in r.stdout, f"connected output ends with tick50: {r.stdout[-40:]!r}"
    k = sbx.commands.run("sleep 300", background=True)
    assert sbx.commands.kill(k.pid), "kill answered false"
    until(lambda: k.pid not in [p.pid for p in sbx.commands.list()], what="killed process gone")
    assert not sbx.commands.kill(k.pid), "killing a dead process answered true"


@check("commands: stdin")
def _():
    h = sbx.commands.run("read a; read b; echo got:$a:$b", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "one\n")
    sbx.commands.send_stdin(h.pid, "two\n")
    eq(h.wait().stdout.strip(), "got:one:two", "stdin lines")
    h = sbx.commands.run("wc -c", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "12345")
    sbx.commands.close_stdin(h.pid)
    eq(h.wait().stdout.strip(), "5", "close_stdin ends input")


@check("files: write, read, write many, exists, get_info")
def _():
    info = sbx.files.write("/home/user/hello.txt", "hello world")
    eq(info.path, "/home/user/hello.txt", "write info path")
    eq(sbx.files.read("/home/user/hello.txt"), "hello world", "read text")
    eq(bytes(sbx.files.read("hello.txt", format="bytes")), b"hello world", "relative path, bytes")
    sbx.files.write_files(
        [
            {"path": "/home/user/many/a.txt", "data": "A"},
            {"path": "/home/user/many/sub/b.bin", "data": b"\x00\x01\xff"},
        ]
    )
    eq(sbx.files.read("/home/user/many/a.txt"), "A", "many a")
    eq(bytes(sbx.files.read("/home/user/many/sub/b.bin", format="bytes")), b"\x00\x01\xff", "many b")
    assert sbx.files.exists("/home/user/many/a.txt"), "exists"
    assert not sbx.files.exists("/home/user/nope"), "not exists"
    gi = sbx.files.get_info("/home/user/hello.txt")
    eq((gi.type, gi.size, gi.owner), (FileType.FILE, 11, "user"), "get_info")
    try:
        sbx.files.read("/home/user/nope")
        raise AssertionError("reading a missing file succeeded")
    except NotFoundException:
        pass
    eq(sbx.commands.run("cat /home/user/many/a.txt").stdout, "A", "files meet commands")
    url = sbx.download_url("/home/user/many/a.txt", use_signature_expiration=60)
    eq(urllib.request.urlopen(url, timeout=10).read(), b"A", "signed download URL")
    bad = url.replace("signature=v1_", "signature=v1_x")
    try:
        urllib.request.urlopen(bad, timeout=10)
        raise AssertionError("a tampered signature was accepted")
    except urllib.error.HTTPError as e:
        eq(e.code, 401, "tampered signature")


@check("files: list with depth, make_dir, rename, remove")
def _():
    names = sorted(e.name for e in sbx.files.list("/home/user/many"))
    eq(names, ["a.txt", "sub"], "depth 1")
    deep = sorted(e.path for e in sbx.files.list("/home/user/many", depth=2))
    eq(deep, ["/home/user/many/a.txt", "/home/user/many/sub", "/home/user/many/sub/b.bin"], "depth 2")
    assert sbx.files.make_dir("/home/user/newdir/x"), "make_dir created"
    assert not sbx.files.make_dir("/home/user/newdir/x"), "make_dir of an existing dir"
    eq(sbx.files.get_info("/home/user/newdir/x").type, FileType.DIR, "dir type")
    moved = sbx.files.rename("/home/user/hello.txt", "/home/user/newdir/moved.txt")
    eq(moved.path, "/home/user/newdir/moved.txt", "renamed path")
    eq(sbx.files.read("/home/user/newdir/moved.txt"), "hello world", "renamed content")
    sbx.files.remove("/home/user/newdir")
    assert not sbx.files.exists("/home/user/newdir"), "removed recursively"


@check("files: watch_dir")
def _():
    sbx.files.make_dir("/home/user/watched")
    w = sbx.files.watch_dir("/home/user/watched")
    sbx.files.write("/home/user/watched/new.txt", "x")
    sbx.commands.run("rm -f /home/user/watched/gone; echo more >> /home/user/watched/new.txt")
    events = until(lambda: w.get_new_events(), what="watch events")
    kinds = {(e.name, e.type) for e in events}
    assert ("new.txt", FilesystemEventType.CREATE) in kinds, f"create seen: {kinds}"
    sbx.files.remove("/home/user/watched/new.txt")
    events = until(lambda: w.get_new_events(), what="remove event")
    assert ("new.txt", FilesystemEventType.REMOVE) in {(e.name, e.type) for e in events}, events
    w.stop()


@check("files: watch_dir streaming (async SDK)")
def _():
    async def main():
        a = await AsyncSandbox.connect(sbx.sandbox_id)
        await a.files.make_dir("/home/user/streamed")
        seen = []
        handle = await a.files.watch_dir("/home/user/streamed", on_event=seen.append, recursive=True)
        await a.files.write("/home/user/streamed/sub/f.txt", "y")
        deadline = time.time() + 10
        while time.time() < deadline and not any(e.name == "sub/f.txt" for e in seen):
            await asyncio.sleep(0.2)
        await handle.stop()
        return seen

    seen = asyncio.run(main())
    names = {(e.name, e.type) for e in seen}
    assert ("sub", FilesystemEventType.CREATE) in names, names
    assert ("sub/f.txt", FilesystemEventType.CREATE) in names, names


@check("commands: stream_input")
def _():
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, ["chunk-1 ", b"chunk-2\n"])
    sbx.commands.close_stdin(h.pid)
    eq(h.wait().stdout, "chunk-1 chunk-2\n", "streamed input")


@check("metrics")
def _():
    m = sbx.get_metrics()
    eq(len(m), 1, "one sample")
    assert m[0].mem_total > 0 and m[0].disk_total > 0, m[0]
    assert 0 < m[0].disk_used < m[0].disk_total, m[0]
    assert m[0].mem_used > 0, m[0]
    # A busy loop shows up as CPU use (sampled over 100 ms).
    spin = sbx.commands.run("while :; do :; done", background=True)
    try:
        busy = sbx.get_metrics()[0].cpu_used_pct
        assert busy > 10, f"cpu_used_pct {busy} with a busy loop running"
    finally:
        sbx.commands.kill(spin.pid)


@check("pty: create, send input, resize, kill")
def _():
    out = bytearray()
    term = sbx.pty.create(PtySize(rows=24, cols=80), timeout=60)
    result = {}

    def reader():
        try:
            result["r"] = term.wait(on_pty=out.extend)
        except CommandExitException as e:
            result["r"] = e
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sbx.pty.send_stdin(term.pid, b"stty size; echo pty-$((40+2))\n")
    until(lambda: b"pty-42" in out, what="pty echo")
    assert b"24 80" in out, f"initial size: {bytes(out)[-200:]!r}"
    sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(term.pid, b"stty size\n")
    until(lambda: b"30 100" in out, what="resized")
    assert sbx.pty.kill(term.pid), "pty kill"
    t.join(15)
    assert "error" not in result, f"pty stream failed: {result.get('error')!r}"
    assert "r" in result, "pty stream did not end after kill"
    assert result["r"].exit_code != 0, "killed pty exit code"


@check("pause and connect: processes survive")
def _():
    h = sbx.commands.run("i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done", background=True)
    until(lambda: sbx.files.read("/tmp/count").strip() not in ("", "0"), what="counter running", missing_ok=True)
    assert sbx.pause(), "pause"
    assert not Sandbox.pause(sbx.sandbox_id), "second pause answers already paused"
    eq(Sandbox.get_info(sbx.sandbox_id).state, SandboxState.PAUSED, "paused state")
    paused = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()]
    assert sbx.sandbox_id in paused, "listed as paused"
    back = Sandbox.connect(sbx.sandbox_id)
    eq(back.get_info().state, SandboxState.RUNNING, "running after connect")
    assert h.pid in [p.pid for p in back.commands.list()], "the process survived"
    first = int(back.files.read("/tmp/count").strip())
    until(lambda: int(back.files.read("/tmp/count").strip()) > first, what="counter continues")
    back.commands.kill(h.pid)


@check("get_host: a server inside the sandbox")
def _():
    if os.environ.get("E2B_CONFORMANCE_PORT_PROXY") != "1":
        return "needs burrow's port proxy (set E2B_CONFORMANCE_PORT_PROXY=1)"
    sbx.files.write("/home/user/site/index.html", "served from burrow")
    sbx.commands.run("cd /home/user/site && python3 -m http.server 8000", background=True)
    host = sbx.get_host(8000)
    server = os.environ["E2B_API_URL"]

    def fetch():
        # The sandbox's access token opens its ports too (burrow's port proxy takes X-Access-Token).
        req = urllib.request.Request(
            server + "/index.html",
            headers={"Host": host, "X-Access-Token": sbx._envd_access_token or ""},
        )
        if sbx.traffic_access_token:
            req.add_header("e2b-traffic-access-token", sbx.traffic_access_token)
        try:
            return urllib.request.urlopen(req, timeout=5).read()
        except Exception:  # noqa: BLE001 - retried until the server is up
            return None

    body = until(fetch, secs=20, what="port proxy answers")
    eq(body, b"served from burrow", "proxied body")


@check("kill: gone afterwards")
def _():
    assert other.kill(), "kill"
    assert not Sandbox.kill(other.sandbox_id), "second kill answers false (404)"
    try:
        Sandbox.get_info(other.sandbox_id)
        raise AssertionError("get_info of a killed sandbox succeeded")
    except NotFoundException:
        pass
    assert not other.is_running(), "is_running after kill"


sbx.kill()
print(f"{len(failures)} failed: {failures}" if failures else "all checks passed", flush=True)
sys.exit(len(failures))
