#!/usr/bin/env python3
"""burrow's code-interpreter server: the HTTP API the `e2b-code-interpreter` SDKs call on port
49999 of a sandbox, served over Jupyter kernels (ipykernel, driven with jupyter_client).

Written for burrow (docs/code-interpreter.md); it answers the routes and the shapes the SDK
parses, nothing more:

- `GET /health`: 200 once the default Python context's kernel answers, 503 before.
- `POST /execute` `{"code", "context_id"?, "language"?, "env_vars"?}`: newline-delimited JSON,
  one object per kernel message, streamed as the kernel sends them: `stdout` / `stderr`
  (`text`, `timestamp` in ns), `result` (the display data's MIME bundle under E2B's names, plus
  `is_main_result`), `error` (`name`, `value`, `traceback`), then `number_of_executions`.
  A client that goes away (the SDK's `timeout`, a cancelled request) interrupts the kernel, so
  the context stays usable and keeps its state.
- `GET /contexts`, `POST /contexts` `{"language"?, "cwd"?}`, `DELETE /contexts/{id}`,
  `POST /contexts/{id}/restart`: one kernel per context.

Languages: Python. Any other language is a 501 that names it.

Each context runs one cell at a time (later requests wait their turn), as a notebook does.
"""

import asyncio
import inspect
import json
import os
import queue
import sys
import time
import uuid

# The packages sit next to this file (`site/`, see build-bundle.sh and the Dockerfile). Kernels
# are started with this environment, so they import from there as well.
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
if os.path.isdir(SITE):
    sys.path.insert(0, SITE)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if SITE not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([SITE, *paths])

import tornado.iostream
import tornado.web
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

PORT = int(os.environ.get("BURROW_CODE_INTERPRETER_PORT", "49999"))
DEFAULT_CWD = os.environ.get("HOME", "/home/user")
# The languages this server has a kernel for, and the name each is listed under.
KERNELS = {"python": "python3"}
ALIASES = {"python3": "python", "py": "python"}
# How long a kernel may take to answer its first request (a loaded machine is slow to import
# IPython).
KERNEL_READY_S = 120
# How often a running cell checks that its client is still there and its kernel alive.
POLL_S = 0.5

# Kernel MIME types under the names the SDK's `Result` has; anything else goes under `extra`.
MIME_NAMES = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}


def now_ns():
    return time.time_ns()


def result_of(data, main):
    out = {"type": "result", "is_main_result": main}
    extra = {}
    for mime, value in data.items():
        name = MIME_NAMES.get(mime)
        if name:
            out[name] = value
        else:
            extra[mime] = value
    if extra:
        out["extra"] = extra
    return out


class Unsupported(Exception):
    pass


def language_of(raw):
    lang = (raw or "python").strip().lower()
    lang = ALIASES.get(lang, lang)
    if lang not in KERNELS:
        raise Unsupported(
            f"language {lang!r} is not supported by burrow's code interpreter: "
            f"it runs {', '.join(sorted(KERNELS))} only"
        )
    return lang


class Context:
    """One kernel, and the lock that keeps its cells in order."""

    def __init__(self, language, cwd):
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        self.lock = asyncio.Lock()
        self.km = None
        self.kc = None

    def describe(self):
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def start(self):
        # Unix sockets, not loopback TCP ports: only this sandbox's user can reach the kernel.
        # The socket paths are absolute: the kernel runs in the context's cwd, not ours.
        runtime = jupyter_runtime_dir()
        os.makedirs(runtime, mode=0o700, exist_ok=True)
        self.km = AsyncKernelManager(
            kernel_name=KERNELS[self.language],
            transport="ipc",
            ip=os.path.join(runtime, f"kernel-{self.id}"),
        )
        await self.km.start_kernel(cwd=self.cwd, env=dict(os.environ))
        await self._connect()

    async def _connect(self):
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=KERNEL_READY_S)

    async def restart(self):
        if self.kc is not None:
            self.kc.stop_channels()
        await self.km.restart_kernel(now=True)
        await self._connect()

    async def shutdown(self):
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None:
            await self.km.shutdown_kernel(now=True)

    async def alive(self):
        return await maybe_await(self.km.is_alive())

    async def quiet(self, code):
        """Runs `code` without output or history (the environment of one cell)."""
        msg_id = self.kc.execute(code, silent=True, store_history=False)
        while True:
            try:
                msg = await self.kc.get_iopub_msg(timeout=KERNEL_READY_S)
            except queue.Empty:
                return
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"].get("execution_state") == "idle"
            ):
                return

    async def run(self, code, env, gone):
        """Yields the cell's output as the SDK's JSON objects. `gone` is set when the client
        left: the kernel is interrupted and the rest of the output is drained, unsent."""
        if env:
            await self.quiet(
                "import os as _burrow_os\n"
                f"_burrow_saved_env = {{k: _burrow_os.environ.get(k) for k in {list(env)!r}}}\n"
                f"_burrow_os.environ.update({env!r})\n"
            )
        try:
            async for out in self._run(code, gone):
                yield out
        finally:
            if env:
                await self.quiet(
                    "for _k, _v in _burrow_saved_env.items():\n"
                    "    if _v is None: _burrow_os.environ.pop(_k, None)\n"
                    "    else: _burrow_os.environ[_k] = _v\n"
                    "del _burrow_saved_env, _k, _v\n"
                )

    async def _run(self, code, gone):
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False)
        interrupted = False
        count = None
        while True:
            if gone.is_set() and not interrupted:
                interrupted = True
                await maybe_await(self.km.interrupt_kernel())
            try:
                msg = await self.kc.get_iopub_msg(timeout=POLL_S)
            except queue.Empty:
                if not await self.alive():
                    yield {
                        "type": "error",
                        "name": "KernelDied",
                        "value": "the kernel exited while running this cell; it was restarted "
                        "and its state is lost",
                        "traceback": "",
                    }
                    await self.restart()
                    return
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                name = "stderr" if content.get("name") == "stderr" else "stdout"
                yield {"type": name, "text": content.get("text", ""), "timestamp": now_ns()}
            elif kind == "execute_result":
                count = content.get("execution_count", count)
                yield result_of(content.get("data", {}), True)
            elif kind == "display_data":
                yield result_of(content.get("data", {}), False)
            elif kind == "error":
                yield {
                    "type": "error",
                    "name": content.get("ename", ""),
                    "value": content.get("evalue", ""),
                    "traceback": "\n".join(content.get("traceback", [])),
                }
            elif kind == "execute_input":
                count = content.get("execution_count", count)
            elif kind == "status" and content.get("execution_state") == "idle":
                break
        if count is not None:
            yield {"type": "number_of_executions", "execution_count": count}


async def maybe_await(v):
    if inspect.isawaitable(v):
        return await v
    return v


class Contexts:
    def __init__(self):
        self.by_id = {}
        # The context `run_code(language=...)` uses when it names no context.
        self.default = {}
        self.ready = False
        self.starting = {}

    async def create(self, language, cwd):
        ctx = Context(language, cwd or DEFAULT_CWD)
        await ctx.start()
        self.by_id[ctx.id] = ctx
        return ctx

    async def default_for(self, language):
        if language in self.default:
            return self.default[language]
        # Two first requests for a language share one kernel start.
        task = self.starting.get(language)
        if task is None:
            task = asyncio.ensure_future(self.create(language, DEFAULT_CWD))
            self.starting[language] = task
        try:
            ctx = await task
        finally:
            self.starting.pop(language, None)
        self.default.setdefault(language, ctx)
        return self.default[language]

    async def remove(self, ctx):
        self.by_id.pop(ctx.id, None)
        for lang, d in list(self.default.items()):
            if d is ctx:
                del self.default[lang]
        await ctx.shutdown()


CONTEXTS = Contexts()


class Base(tornado.web.RequestHandler):
    def json_body(self):
        if not self.request.body.strip():
            return {}
        try:
            v = json.loads(self.request.body)
        except ValueError as e:
            raise tornado.web.HTTPError(400, reason=f"malformed JSON body: {e}")
        if not isinstance(v, dict):
            raise tornado.web.HTTPError(400, reason="the body must be a JSON object")
        return v

    def fail(self, status, message):
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"code": status, "message": message}))

    def write_error(self, status_code, **kwargs):
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"code": status_code, "message": self._reason}))

    def context(self, context_id):
        ctx = CONTEXTS.by_id.get(context_id)
        if ctx is None:
            raise tornado.web.HTTPError(404, reason=f"context {context_id} not found")
        return ctx


class Health(Base):
    def get(self):
        if not CONTEXTS.ready:
            return self.fail(503, "the default Python kernel is starting")
        self.finish({"status": "ok"})


class ContextList(Base):
    def get(self):
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps([c.describe() for c in CONTEXTS.by_id.values()]))

    async def post(self):
        body = self.json_body()
        try:
            lang = language_of(body.get("language"))
        except Unsupported as e:
            return self.fail(501, str(e))
        ctx = await CONTEXTS.create(lang, body.get("cwd"))
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(ctx.describe()))


class ContextOne(Base):
    async def delete(self, context_id):
        await CONTEXTS.remove(self.context(context_id))
        self.set_status(204)
        self.finish()


class ContextRestart(Base):
    async def post(self, context_id):
        ctx = self.context(context_id)
        async with ctx.lock:
            await ctx.restart()
        self.set_status(204)
        self.finish()


class Execute(Base):
    def initialize(self):
        self.gone = asyncio.Event()

    def on_connection_close(self):
        self.gone.set()

    async def post(self):
        body = self.json_body()
        code = body.get("code")
        if not isinstance(code, str):
            return self.fail(400, "code must be a string")
        env = body.get("env_vars") or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            return self.fail(400, "env_vars must map names to strings")
        if body.get("context_id") and body.get("language"):
            return self.fail(400, "give context_id or language, not both")
        if body.get("context_id"):
            ctx = self.context(body["context_id"])
        else:
            try:
                lang = language_of(body.get("language"))
            except Unsupported as e:
                return self.fail(501, str(e))
            ctx = await CONTEXTS.default_for(lang)
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-store")
        async with ctx.lock:
            # Headers go out at once: the SDK reads the status before the first line.
            await self.send(None)
            async for out in ctx.run(code, env, self.gone):
                await self.send(out)
        if not self.gone.is_set():
            self.finish()

    async def send(self, obj):
        if self.gone.is_set():
            return
        if obj is not None:
            self.write(json.dumps(obj) + "\n")
        try:
            await self.flush()
        except tornado.iostream.StreamClosedError:
            self.gone.set()


async def main():
    app = tornado.web.Application(
        [
            (r"/health", Health),
            (r"/execute", Execute),
            (r"/contexts", ContextList),
            (r"/contexts/([^/]+)", ContextOne),
            (r"/contexts/([^/]+)/restart", ContextRestart),
        ]
    )
    app.listen(PORT, address="0.0.0.0")
    print(f"burrow code interpreter on :{PORT}", flush=True)
    await CONTEXTS.default_for("python")
    CONTEXTS.ready = True
    print("default python kernel ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
