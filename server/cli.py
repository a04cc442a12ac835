"""`qwen-vl-serve`: command-line flags onto `Settings`, then uvicorn with graceful drain.

Every `Settings` field is a flag (`--max-model-len`); flags given on the command line win
over `QWENVL_*` environment variables, which win over defaults. Without `--model`, a tiny
random-weight checkpoint is generated and served on CPU, so a newcomer sees it work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import ValidationError

from server.settings import Settings, unknown_env_names

log = logging.getLogger("qwenvl")

# Flags whose name differs from the field (the singular reads better when repeated).
_FLAG_NAMES = {"api_keys": "--api-key"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused flag prints one line naming the problem and where the flags are
    listed, not the whole usage: with every setting a flag, the usage is 4 KB and the error
    itself scrolls away under it."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qwen-vl-serve",
        description="OpenAI-compatible server for the Qwen-VL family on vLLM. Every option "
        "can also be set as QWENVL_<NAME> in the environment.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        help_text = (field.description or "") + _default_text(field) + f" [env QWENVL_{name.upper()}]"
        ann = _unwrap_optional(field.annotation)
        origin = typing.get_origin(ann)
        if ann is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif origin is list or _is_csv(field):
            parser.add_argument(flag, dest=name, action="append", metavar="VALUE",
                                help=help_text + " (repeat or comma-separate)")
        elif origin is Literal:
            parser.add_argument(flag, dest=name, choices=[str(c) for c in typing.get_args(ann)], type=str.lower,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, metavar=name.upper(), help=help_text)
    return parser


def _default_text(field) -> str:
    """' (default: X)' for help; nothing where the default is "unset" (None, empty), which
    each such field's description explains (device-dependent values, no key, ...)."""
    default = field.get_default(call_default_factory=True)
    if default is None or default == [] or default == "":
        return ""
    if isinstance(default, bool):
        default = "on" if default else "off"
    elif isinstance(default, list):
        default = ",".join(map(str, default))
    return f" (default: {default})"


def _unwrap_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _is_csv(field) -> bool:
    return typing.get_origin(field.annotation) is list


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from flags and environment. Exits with status 2 and a readable message on
    invalid values."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        return Settings(**args)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" if e["loc"]
            else e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable


#: A Hugging Face hub id, as the hub's own check spells it: a name or namespace/name.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")


def model_problem(model: str | None) -> str | None:
    """Why `model` can be neither a checkpoint directory nor a hub id, or None. (A local path
    that does not exist reached vLLM as a hub id, which failed after start-up with "Repo id
    must be in the form 'repo_name' or 'namespace/repo_name'".) Checked when serving only:
    the health check reads the same flags elsewhere."""
    if model is None:
        return None
    if Path(model).is_dir():
        if not (Path(model) / "config.json").is_file():
            return f"--model {model} has no config.json; give a checkpoint's directory (its config and weights)"
        return None
    if Path(model).exists():
        return f"--model {model} is a file; give the checkpoint's directory"
    if not _HUB_ID.fullmatch(model):
        return f"--model {model}: no such directory (nor a hub id such as Qwen/Qwen2-VL-7B-Instruct)"
    return None


def ensure_model(settings: Settings) -> str:
    """The model to serve: --model, or a generated tiny checkpoint (cached on disk)."""
    if settings.model:
        return settings.model
    from server.tiny_model import write_tiny_model

    out = Path(settings.tiny_model_dir) / f"{settings.tiny_arch}-seed0"
    marker = out / ".complete"
    if not marker.exists():
        log.warning("no --model given: generating a tiny random-weight %s checkpoint in %s "
                    "(a demo: its answers are gibberish)", settings.tiny_arch, out)
        write_tiny_model(settings.tiny_arch, out, seed=0)
        marker.write_text("ok\n")
    return str(out)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    # ("trace" is uvicorn's level below debug, not yet known to logging here)
    level = 5 if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, close in unknown_env_names(os.environ):
        log.warning("ignoring %s: no setting has that name%s", name, f" (did you mean {close}?)" if close else "")
    if problem := model_problem(settings.model):
        build_parser().error(problem)
    model = ensure_model(settings)
    if settings.served_model_name is None:
        settings = settings.model_copy(update={"served_model_name": settings.model or "qwen-vl-tiny"})
    return serve(settings, model)


def serve(settings: Settings, model: str) -> int:
    import uvicorn

    from server.app import create_app

    exit_code = {"code": 0}
    server_ref: dict[str, Any] = {}

    def on_fatal(code: int) -> None:
        exit_code["code"] = code
        srv = server_ref.get("server")
        if srv is not None:
            srv.should_exit = True

    app = create_app(
        settings,
        engine_factory=lambda: _load_engine(settings, model),
        model_names=[settings.served_model_name or model],
        on_fatal=on_fatal,
    )
    runtime = app.state.runtime
    config = uvicorn_config(app, settings)
    server = _DrainingServer(config, runtime, settings.drain_timeout)
    server_ref["server"] = server
    # Bind before the app starts: a taken port ends the process (uvicorn logs why and
    # exits 3) before the engine spends a minute loading for nothing.
    sock = config.bind_socket()
    server.run(sockets=[sock])
    return exit_code["code"]


def _load_engine(settings: Settings, model: str):
    """The engine for this server process, with vLLM's environment variables cached."""
    from server.engine.vllm_engine import VLLMEngine

    engine = VLLMEngine.load(settings, model)
    # vLLM reads its environment variables anew at each use: in this process several
    # getenv calls per engine step and per request (about 2 % of the front end's time at 64
    # streams). Its engine core and workers cache them once started; so may this process,
    # which changes none of them after the engine is up. (Not in VLLMEngine.load: a test
    # process loads engines with different environments one after another.)
    import vllm.envs

    vllm.envs.enable_envs_cache()
    return engine


def _refusal_counter(app) -> Callable[[str], None] | None:
    """Counts the HTTP layer's own refusals (431, 414, 408, malformed HTTP) in the app's
    error counter, beside the app's errors."""
    metrics = getattr(getattr(getattr(app, "state", None), "runtime", None), "metrics", None)
    if metrics is None:
        return None
    return lambda code: metrics.errors.labels(code).inc()


def uvicorn_config(app, settings: Settings, **overrides: Any):
    """uvicorn's configuration for `app` under `settings` (`overrides`: uvicorn.Config's own
    arguments, for tests)."""
    import uvicorn

    from server.http_protocol import guarded_protocol

    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=guarded_protocol(settings.max_header_bytes, settings.header_timeout, settings.send_timeout,
                              on_refusal=_refusal_counter(app)),
        ws="none",  # no WebSocket routes: an Upgrade header gets plain HTTP handling
        timeout_keep_alive=75,  # longer than typical LB idle timeouts (nginx keepalive 60 s)
        access_log=False,  # one structured line per request comes from our middleware
        server_header=False,  # ("server: uvicorn" tells a scanner what to try; clients need nothing of it)
        timeout_graceful_shutdown=5,
        # "auto" takes an app whose start-up raises for one without lifespan support, and
        # serves on without a model; a start-up failure must end the process
        lifespan="on",
    )
    return uvicorn.Config(app, **{**options, **overrides})


def _exit_now(code: int) -> None:
    """Kill the engine processes and exit without any further cleanup (a second SIGTERM:
    the operator wants the process gone; a normal vLLM teardown takes several seconds)."""
    import os

    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        children = []
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    logging.shutdown()
    os._exit(code)


class _DrainingServer:
    """uvicorn.Server whose first SIGTERM/SIGINT drains (readiness 503, new requests 503,
    in-flight work finishes up to the drain timeout) and whose second exits at once."""

    def __new__(cls, config, runtime, drain_timeout: float):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                # Not recorded in _captured_signals: uvicorn would re-raise it after shutdown
                # and the process would die by the signal instead of exiting 0.
                if runtime.draining or self.should_exit:
                    log.warning("second signal: aborting all requests and exiting now")
                    _exit_now(1)
                loop = self._loop
                loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

            async def startup(self, sockets=None) -> None:
                self._loop = asyncio.get_running_loop()
                await super().startup(sockets)

            async def _drain(self) -> None:
                if runtime.engine is None:
                    # Still loading the model, in a thread nothing can interrupt (and that the
                    # interpreter would wait for at exit): nothing is in flight, so stop the
                    # engine's processes started so far and exit now.
                    log.warning("stopped while the model was loading: exiting")
                    _exit_now(0)
                log.info("draining: up to %.0f s for %d in-flight requests", drain_timeout, runtime.admission.active)
                await runtime.drain(drain_timeout)
                self.should_exit = True

        return Server(config)


if __name__ == "__main__":
    sys.exit(main())
