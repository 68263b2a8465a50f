"""fanformer-serve start-up: the port is bound before the model loads, every failure is one
line, the log says what was loaded; vLLM's flag names; slow clients and connection floods."""

from __future__ import annotations

import gc
import re
import signal
import socket
import subprocess
import time

import httpx
import pytest

from server.cli import CLIError, bind, build_parser, builder_argv, check_args
from server.launch import freeze_startup_heap
from tests.test_api import run_cli, spawn_server, wait_healthy


def _one_line(result: subprocess.CompletedProcess, code: int = 1) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fanformer-serve: "), result.stderr
    return lines[0]


def test_a_taken_port_fails_before_the_model_loads(tmp_path):
    broken = tmp_path / "ckpt"  # loading it would fail with a checkpoint error instead
    broken.mkdir()
    (broken / "config.json").write_text("not json")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        line = _one_line(run_cli(str(broken), "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in line
    assert "--port" in line and time.monotonic() - started < 60


@pytest.mark.parametrize("argv, message, code", [  # 2: argparse's usage error, 1: CLIError
    (["--port", "70000"], "must be in [0, 65535], got 70000", 2),
    (["--max-num-seqs", "0"], "--max_num_seqs must be at least 1", 1),
    (["--timeout-headers", "-1"], "--timeout_headers must be >= 0", 1),
    (["--bogus"], "unrecognized arguments: --bogus", 2),
])
def test_bad_flags_are_one_line(argv, message, code):
    assert message in _one_line(run_cli(*argv), code=code)


def test_vllm_spellings_mean_the_same(tmp_path):
    def parsed(*argv: str) -> dict:
        args = build_parser().parse_args(argv)
        check_args(args)
        return {k: v for k, v in vars(args).items() if k != "model"}

    ck = str(tmp_path)
    ours = parsed("--checkpoint", ck, "--max_model_len", "64", "--api_key", "k",
                  "--served_model_name", "m", "--dtype", "float16")
    assert parsed(ck, "--max-model-len", "64", "--api-key", "k", "--served-model-name", "m",
                  "--dtype", "half") == ours
    assert parsed("--model", ck, "--max-model-len=64", "--api-key=k", "--served-model-name",
                  "m", "--dtype=float16") == ours


def test_two_different_checkpoints_are_refused(tmp_path):
    args = build_parser().parse_args([str(tmp_path), "--model", str(tmp_path / "other")])
    with pytest.raises(CLIError, match="two checkpoints"):
        check_args(args)


def test_help_shows_defaults():
    text = " ".join(build_parser().format_help().split())
    assert "(default: 8000)" in text and "--timeout_headers" in text and "(default: 10.0)" in text


def test_ray_builder_switches_take_true_or_false():
    """`serve run server.cli:ray_app_builder no_prefix_caching=true`: a switch takes
    true/false (Ray's CLI always gives a value), a valued flag keeps it."""
    parser = build_parser()
    on = parser.parse_args(builder_argv(parser, {"no_prefix_caching": "true", "block_size": "32"}))
    off = parser.parse_args(builder_argv(parser, {"no_prefix_caching": "False"}))
    dashed = parser.parse_args(builder_argv(parser, {"no-prefix-caching": "true"}))
    assert (on.enable_prefix_caching, on.block_size) == (False, 32)
    assert off.enable_prefix_caching is True
    assert dashed.enable_prefix_caching is False  # the dashed spelling is the same switch
    with pytest.raises(SystemExit):
        builder_argv(parser, {"no_prefix_caching": "maybe"})


def test_bind_reports_the_real_port():
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockname()[1] > 0
    finally:
        sock.close()


def _connections(url: str, n: int, payload: bytes) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        if payload:
            s.sendall(payload)
        socks.append(s)
    return socks


def _closed_by_server(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_flood_of_unfinished_requests_cannot_lock_clients_out(checkpoint_dir):
    """300 connections that never finish their headers (or send nothing), against a cap of
    50: new clients are still served at once, the server holds at most ~50 connections, and
    the header timeout closes every flooder."""
    psutil = pytest.importorskip("psutil")
    proc, url = spawn_server(checkpoint_dir, "--max_connections", "50", "--timeout_headers",
                             "3", "--log_level", "warning")
    flood: list[socket.socket] = []
    try:
        wait_healthy(proc, url)
        flood += _connections(url, 150, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        flood += _connections(url, 150, b"")
        started = time.monotonic()
        with httpx.Client(timeout=10) as http:  # fresh connections each time
            for _ in range(5):
                assert http.get(url + "/health", headers={"Connection": "close"}
                                ).status_code == 200
        assert time.monotonic() - started < 3  # served before any header timeout fired
        server_sockets = [c for c in psutil.Process(proc.pid).net_connections("tcp")
                          if c.status == psutil.CONN_ESTABLISHED]
        assert len(server_sockets) <= 51, len(server_sockets)
        deadline = time.monotonic() + 15
        assert all(_closed_by_server(s, max(0.1, deadline - time.monotonic())) for s in flood)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        for s in flood:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_slow_body_is_timed_out_and_logs_name_the_checkpoint(checkpoint_dir):
    proc, url = spawn_server(checkpoint_dir, "--timeout_body", "1", "--max_num_seqs", "2",
                             stderr=subprocess.PIPE)
    try:
        wait_healthy(proc, url)
        (slow,) = _connections(url, 1, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                       b"Content-Type: application/json\r\n"
                                       b"Content-Length: 100\r\n\r\n{\"prompt\"")
        assert _closed_by_server(slow, 20)
        slow.close()
        assert httpx.get(url + "/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert f"loaded {checkpoint_dir} (not quantized, float32 on cpu); KV cache: 16 blocks x " \
           "16 tokens (256 tokens)" in err, err
    frozen = re.search(r"garbage collector: (\d+) start-up objects frozen", err)
    assert frozen and int(frozen[1]) > 10_000, err  # the model, engine and app at least


def test_frozen_start_up_objects_leave_the_collectors_passes():
    """What is alive at start-up is out of every collection's walk (so a full pass no longer
    stalls the engine); what is allocated later is collected as before."""
    startup = {"weights": [object()]}
    try:
        assert freeze_startup_heap() == gc.get_freeze_count() > 0
        later = {"request": [startup]}
        tracked = gc.get_objects()
        assert not any(o is startup for o in tracked)
        assert any(o is later for o in tracked)
    finally:
        gc.unfreeze()


def test_generate_takes_hf_names_and_dashes(checkpoint_dir, capsys):
    from server.generate_cli import main

    common = ["--model", str(checkpoint_dir), "--prompt", "Alice", "--temperature", "0",
              "--dtype", "float32"]
    assert main([*common, "--max_length", "6"]) == 0
    ours = capsys.readouterr().out
    assert main([*common, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == ours
    assert main([*common, "--max_new_tokens", "3"]) == 0
    assert capsys.readouterr().out != ours
