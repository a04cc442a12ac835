"""`qwen-vl-serve` start-up failures that need no engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def test_a_taken_port_fails_fast_before_the_engine_loads(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "--model", str(tmp_path),
             "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )
        elapsed = time.monotonic() - started
    assert proc.returncode != 0  # uvicorn exits 3 on a start-up failure
    assert "address already in use" in proc.stderr.lower()
    assert "engine" not in proc.stderr.lower()  # nothing was loaded
    assert elapsed < 60


def test_a_model_that_is_neither_a_directory_nor_a_hub_id_stops_the_server_at_once(tmp_path):
    """A local path that does not exist went to vLLM as a hub id: the server reported itself
    started, then failed with "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    for model, words in ((str(tmp_path / "no-such-model"), "no such directory"),
                         ("./models/Qwen2-VL-7B-Instruct", "no such directory"),
                         (str(tmp_path / "weights.safetensors"), "is a file")):
        proc = subprocess.run([sys.executable, "-m", "server.cli", "--model", model, "--port", "0"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-500:]
        assert words in proc.stderr and model in proc.stderr
        assert "Traceback" not in proc.stderr and "Uvicorn running" not in proc.stderr
    from server.cli import model_problem

    assert model_problem("Qwen/Qwen2-VL-7B-Instruct") is None and model_problem("Qwen-VL-Chat") is None
    assert "has no config.json" in model_problem(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert model_problem(str(tmp_path)) is None


def test_bad_start_up_values_are_refused_at_once_in_one_line(tmp_path):
    """Values that only failed once the engine had loaded: a malformed CIDR left the server
    "loading" for good (its liveness probe fine, nothing in the log), a directory that is
    no checkpoint, an unknown dtype or a missing generation config ended in a traceback
    after the port was open, and a missing media directory was accepted without a word."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (tmp_path / "not-a-checkpoint").mkdir()
    for flags, words in (
            (["--image-allow-networks", "10.0.0.0/33"], "'10.0.0.0/33' is not an IP network"),
            (["--image-allow-networks", "10.0.0.0/8,notacidr"], "'notacidr' is not an IP network"),
            (["--allowed-local-media-path", str(tmp_path / "missing")], "is not a directory"),
            (["--dtype", "bogus"], "--dtype"),
            (["--generation-config", str(tmp_path)], "has none"),
            (["--model", str(tmp_path / "not-a-checkpoint")], "has no config.json")):
        argv = [sys.executable, "-m", "server.cli", "--model", str(checkpoint), "--port", "0", *flags]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (flags, proc.stderr[-500:])
        assert words in proc.stderr.splitlines()[-1], (flags, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr and "Uvicorn running" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "server.cli", "--model", str(checkpoint), "--port", "0"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QWENVL_IMAGE_ALLOW_NETWORKS": "192.168.0.0/16,10.1"})
    assert proc.returncode == 2 and "'10.1' is not an IP network" in proc.stderr, proc.stderr[-500:]


def test_settings_only_vllm_can_judge_end_the_server_in_one_line(tiny_model):
    """A --max-model-len beyond the model's, or a device the installed build cannot use, ended
    in vLLM's traceback (and pydantic's dump of every engine argument) with exit status 1."""
    for flags, words in ((["--max-model-len", "99999999"], "the engine refused its settings: User-specified "
                          "max_model_len (99999999) is greater than the derived max_model_len"),
                         (["--device", "cuda"], "the engine refused its settings: --device cuda requested, "
                          "but the installed vLLM build runs on cpu")):
        proc = subprocess.run([sys.executable, "-m", "server.cli", "--model", str(tiny_model("qwen2-vl")),
                               "--host", "127.0.0.1", "--port", "0", *flags],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (flags, proc.stderr[-1500:])
        assert words in proc.stderr, (flags, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr and "input_value" not in proc.stderr


def test_an_api_key_file_that_cannot_be_read_or_holds_no_keys_stops_the_server(tmp_path):
    """A missing file failed inside the app, where uvicorn took the error for an app without
    lifespan and served 500s without ever loading the model; an empty one (a secret mounted
    without its value) left the API open."""
    empty = tmp_path / "empty-keys"
    empty.write_text("# keys go here\n\n")
    for key_file, words in ((tmp_path / "missing", "cannot read the API key file"),
                            (tmp_path, "cannot read the API key file"),
                            (empty, "holds no keys")):
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "--model", str(tmp_path / "no-such-model"),
             "--host", "127.0.0.1", "--port", "0", "--api-key-file", str(key_file)],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-500:]
        assert words in proc.stderr and str(key_file) in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = subprocess.run(  # the same through the environment, as the Docker image takes it
        [sys.executable, "-m", "server.cli", "--model", str(tmp_path / "no-such-model")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "QWENVL_API_KEY_FILE": str(empty)},
    )
    assert proc.returncode == 2 and "holds no keys" in proc.stderr


def test_a_start_up_failure_ends_the_process_instead_of_serving_without_a_model():
    from server.cli import uvicorn_config
    from server.settings import Settings

    assert uvicorn_config(object(), Settings()).lifespan == "on"


def test_a_misspelt_environment_variable_is_named_in_a_warning(tmp_path):
    """Settings ignore unknown QWENVL_* variables; a typo in a ConfigMap would otherwise
    leave its option at the default without a word."""
    with socket.socket() as taken:  # the process stops at the bind, before any engine
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "--model", str(tmp_path),
             "--host", "127.0.0.1", "--port", str(taken.getsockname()[1])],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "QWENVL_MAX_NUM_SEQ": "5", "QWENVL_DRAIN_TIMEOUTS": "99",
                 "QWENVL_NOTHING_LIKE_IT": "1", "QWENVL_DRAIN_TIMEOUT": "12",
                 "QWENVL_HTTP_PORT": "8080"},  # compose's, not the server's
        )
    warned = [line for line in proc.stderr.splitlines() if "ignoring QWENVL_" in line]
    assert sorted(line.split("ignoring ", 1)[1] for line in warned) == [
        "QWENVL_DRAIN_TIMEOUTS: no setting has that name (did you mean QWENVL_DRAIN_TIMEOUT?)",
        "QWENVL_MAX_NUM_SEQ: no setting has that name (did you mean QWENVL_MAX_NUM_SEQS?)",
        "QWENVL_NOTHING_LIKE_IT: no setting has that name",
    ]


def test_api_keys_that_are_all_empty_stop_the_server(tmp_path):
    """A secret's variable set without its value (or `--api-key ""`) left the API open."""
    for args, env in ((["--api-key", ""], {}), (["--api-key", " , "], {}),
                      ([], {"QWENVL_API_KEYS": ""}), ([], {"QWENVL_API_KEY": " "})):
        proc = subprocess.run(
            [sys.executable, "-m", "server.cli", "--model", str(tmp_path / "no-such-model"),
             "--host", "127.0.0.1", "--port", "0", *args],
            capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        )
        assert proc.returncode == 2, (args, env, proc.stderr[-500:])
        assert "all of them are empty" in proc.stderr and "Traceback" not in proc.stderr
    # an empty variable beside a key file that holds keys: the API is not open
    from server.settings import Settings

    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    assert Settings(api_keys=[""], api_key_file=keys).all_api_keys() == ["k1"]


def test_the_singular_key_variable_is_read_as_the_keys(tiny_tokenizer, monkeypatch):
    """QWENVL_API_KEY (vLLM's is VLLM_API_KEY) had only a warning, and the API stayed open."""
    import httpx

    from server.settings import Settings, unknown_env_names
    from support.app_server import scripted_server

    monkeypatch.setenv("QWENVL_API_KEY", "sekrit,other")
    assert unknown_env_names({"QWENVL_API_KEY": "x"}) == []
    with scripted_server(tiny_tokenizer, settings=Settings(served_model_name="scripted")) as srv:
        assert httpx.get(srv.base_url + "/v1/models").status_code == 401
        for key in ("sekrit", "other"):
            assert httpx.get(srv.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    monkeypatch.setenv("QWENVL_API_KEYS", "plural")  # the plural variable wins
    assert Settings().all_api_keys() == ["plural"]


def test_the_log_level_is_one_of_the_known_ones(monkeypatch, capsys):
    import pytest

    from server.cli import parse_settings

    for bad in ("bogus", "warn"):
        with pytest.raises(SystemExit) as exited:
            parse_settings(["--log-level", bad])
        assert exited.value.code == 2 and "--log-level" in capsys.readouterr().err
    assert parse_settings(["--log-level", "WARNING"]).log_level == "warning"
    monkeypatch.setenv("QWENVL_LOG_LEVEL", "DEBUG")
    assert parse_settings([]).log_level == "debug"
    monkeypatch.setenv("QWENVL_LOG_LEVEL", "verbose")
    with pytest.raises(SystemExit):
        parse_settings([])


def test_a_refused_flag_is_one_line_that_points_at_help(capsys):
    """argparse printed the whole usage first: 4 KB, under which the error scrolled away."""
    import pytest

    from server.cli import parse_settings

    for argv, words in ((["--port", "abc"], "--port: Input should be a valid integer"),
                        (["--bogus"], "unrecognized arguments: --bogus"),
                        (["--dtype", "foo"], "argument --dtype: invalid choice: 'foo'")):
        with pytest.raises(SystemExit) as exited:
            parse_settings(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2
        assert len(err.splitlines()) == 1 and err.startswith(f"qwen-vl-serve: error: {words}"), err
        assert err.endswith("(see qwen-vl-serve --help)\n"), err


def test_help_shows_each_default_that_has_a_value():
    from server.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    for shown in ("--port PORT Bind port. (default: 8000)", "Largest n. (default: 8)",
                  "(default: 1073741824)", "--docs, --no-docs", "(default: on) [env QWENVL_DOCS]",
                  "Image fetches in flight at once. (default: 32)"):
        assert shown in text, shown
    # No "(default: None)": unset defaults are explained by their description instead.
    assert "default: None" not in text and "(default: )" not in text


def test_make_serve_passes_its_variables_on_as_flags():
    """`make serve` is the README's first command: PORT, HOST, MODEL and ARGS reach the server."""
    import shlex
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(["make", "-n", "-s", "serve", "PORT=9123", "HOST=0.0.0.0", "MODEL=/m/x",
                          "ARGS=--max-model-len 4096 --api-key k"],
                         cwd=repo, capture_output=True, text=True, timeout=60, check=True).stdout
    line = next(l for l in out.splitlines() if "qwen-vl-serve" in l)
    argv = shlex.split(line)
    assert argv[0].endswith("/bin/qwen-vl-serve")
    assert argv[1:] == ["--host", "0.0.0.0", "--port", "9123", "--model", "/m/x",
                        "--max-model-len", "4096", "--api-key", "k"]


def test_the_serving_process_reads_vllms_environment_once(monkeypatch):
    """vLLM reads its variables anew at each use unless told to cache them, which its engine
    core and workers do; the server process does it once its engine is up."""
    import vllm.envs

    from server import cli
    from server.engine.vllm_engine import VLLMEngine
    from server.settings import Settings

    loaded = object()
    monkeypatch.setattr(VLLMEngine, "load", classmethod(lambda cls, settings, model: loaded))
    vllm.envs.disable_envs_cache()
    try:
        assert cli._load_engine(Settings(), "m") is loaded
        assert vllm.envs._is_envs_cache_enabled()
        monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "7.5")
        first = vllm.envs.VLLM_LOG_STATS_INTERVAL
        monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "9.5")
        assert vllm.envs.VLLM_LOG_STATS_INTERVAL == first  # (read once)
    finally:
        vllm.envs.disable_envs_cache()
